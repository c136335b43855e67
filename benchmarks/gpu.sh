#!/usr/bin/env bash
# One prepared GPU benchmark: our train step and the PyTorch peer side by side on the
# same GPU (distilbert-base, seq 128), JSON lines out, with MFU.
# Needs, in git-ignored folders carried to the GPU machine (see ../shared/GPU.md):
#   .whl/   transformers==4.57.6, tokenizers==0.22.2, huggingface_hub==0.36.0 wheels
# On a machine without a GPU it runs the same commands on the CPU at small sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ -z "${PY_FORCE:-}" ] && PY=.venv/bin/python
PEER=benchmarks/torch_mtl_step.py
if $PY -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
  SIZE=base; SEQ=128; BATCHES="32 256"; DEV=cuda
else
  SIZE=minilm; SEQ=32; BATCHES="8"; DEV=cpu
  echo '{"note": "no GPU found: running the same benchmark on the CPU at small sizes"}'
fi
for B in $BATCHES; do
  $PY benchmarks/train_step.py --size $SIZE --batch $B --seq $SEQ --dtype float32 --steps 10
  $PY benchmarks/train_step.py --size $SIZE --batch $B --seq $SEQ --dtype bfloat16 --steps 10
  if [ -f "$PEER" ] && $PY -c "import torch" 2>/dev/null; then
    $PY "$PEER" --size $SIZE --batch $B --seq $SEQ --device $DEV --amp || true
    [ "$DEV" = cuda ] && { $PY "$PEER" --size $SIZE --batch $B --seq $SEQ --device $DEV --amp --compile || true; }
  fi
done
$PY benchmarks/train_step.py --size $SIZE --batch ${BATCHES##* } --seq $SEQ --dtype bfloat16 --freeze backbone --steps 10
