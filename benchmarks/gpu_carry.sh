#!/usr/bin/env bash
# For a GPU machine without a package registry, whose `.gpu/` folder (wheels, model, the two default
# corpora) was packed beforehand: the three other embedded files configs/types-embedded.yaml and
# scripts/derive_examples.py read, into .gpu/data, so that benchmarks/gpu.sh's `types` part runs there (about 1 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for f in whissells_df.csv mfd2.0.csv political_data.csv; do
  cp "$($PY -c "from mtl_jax.data.assets import embedded_data_file as f; print(f('$f'))")" .gpu/data/
done
du -sh .gpu
