#!/usr/bin/env bash
# The GPU benchmark, unattended, one table at the end (about 6 minutes on one H100):
#   our train step (bf16; batch 256 with mean and cls pooling, batch 32, frozen backbone) and
#   the PyTorch peer (eager bf16, torch.compile bf16, frozen eager bf16) at the same shapes,
#   in the same run; our batch-256 step once more with cuBLAS-only GEMMs (a compile-time
#   probe); then the default `scripts/train.py` twice, with an empty and a warm compile cache
#   (wall time by part and test metrics from its summary.json).
# On a GPU machine: put the wheels, the model and the data in .gpu/ beside the checkout (with an
#   unpack.sh that installs them into .venv), then: source .gpu/unpack.sh && bash benchmarks/gpu.sh
# Without a GPU it runs the same commands on the CPU at tiny sizes (a dry run of the script).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
PEER_PY=${PEER_PY:-$PY}
[ -x .peer/venv/bin/python ] && PEER_PY=.peer/venv/bin/python
OUT=${OUT:-/tmp/mtl_gpu_bench}; rm -rf "$OUT"; mkdir -p "$OUT"
J=$OUT/results.jsonl
if $PY -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
  SIZE=base; SEQ=128; BIG=256; SMALL=32; DEV=cuda; STEPS=20; TRAIN=()
else
  SIZE=minilm; SEQ=16; BIG=8; SMALL=4; DEV=cpu; STEPS=3; TRAIN=(--max-steps 30)
  echo "no GPU: a dry run on the CPU at tiny sizes" >&2
fi
ours() { timeout 300 $PY benchmarks/train_step.py --size $SIZE --seq $SEQ --steps $STEPS --dtype bfloat16 "$@" >> "$J" \
  || echo "{\"failed\": \"ours $*\"}" >> "$J"; }
peer() { timeout 300 $PEER_PY benchmarks/torch_mtl_step.py --size $SIZE --seq $SEQ --steps $STEPS --device $DEV --amp "$@" >> "$J" \
  || echo "{\"failed\": \"peer $*\"}" >> "$J"; }
ours --batch $BIG --pooling mean
ours --batch $BIG --pooling cls
ours --batch $SMALL --pooling mean
ours --batch $BIG --pooling mean --freeze backbone
# a probe: GEMMs through cuBLAS only (no Triton GEMM fusions to autotune): compile seconds and speed
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" ours --batch $BIG --pooling mean
peer --batch $BIG
peer --batch $BIG --compile
peer --batch $SMALL
peer --batch $BIG --freeze-backbone
for cache in empty warm; do
  timeout 600 $PY scripts/train.py --out "$OUT/run_$cache" --overwrite --no-progress --dtype bfloat16 \
    --compile-cache "$OUT/xla" "${TRAIN[@]}" 2> "$OUT/run_$cache.log" >/dev/null
  $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print(json.dumps({'run': sys.argv[2], 'seconds': s['seconds'], \
'test': {t: round(s['test'][t]['accuracy'], 4) for t in ('task_a', 'task_b')}, 'shapes': s['compiled_shapes']}))" \
    "$OUT/run_$cache/summary.json" "$cache" >> "$J" 2>/dev/null || echo "{\"failed\": \"train $cache\"}" >> "$J"
done
$PY benchmarks/gpu_table.py "$J"
