#!/usr/bin/env bash
# For a GPU machine without a package registry, whose `.gpu/` folder (wheels, model, the two default
# corpora) was packed beforehand: the three other embedded files configs/types-embedded.yaml and
# scripts/derive_examples.py read, into .gpu/data, so that benchmarks/gpu.sh's `types` part runs there (about 1 MB),
# and the wheels of the project's pins that such a machine's image may lack or hold in another version
# (tensorboardX, flax, orbax-checkpoint: 2 MB). What travels must stay under 64 MiB with the project: the two
# largest CSV files travel as .xz; there, `xz -d .gpu/data/*.xz` before `source .gpu/unpack.sh`.
# There, the image's own sentence-transformers may need a newer transformers than the carried one: run
# `PEER_PY="env -u PYTHONPATH python3" bash benchmarks/gpu.sh` so that the peer uses the image's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for f in whissells_df.csv mfd2.0.csv political_data.csv; do
  cp "$($PY -c "from mtl_jax.data.assets import embedded_data_file as f; print(f('$f'))")" .gpu/data/
done
xz -9f .gpu/data/political_data.csv .gpu/data/whissells_df.csv
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .gpu/whl tensorboardX==2.6.5 flax==0.12.8 orbax-checkpoint==0.12.8
du -sh .gpu
