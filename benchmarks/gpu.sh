#!/usr/bin/env bash
# The GPU benchmark, unattended, in parts, most important first, within a time budget; one table at the end.
#   steps   our bf16 train step (distilbert-base size, sequence 128: batch 256 with mean and cls pooling,
#           batch 32, a frozen backbone) and the PyTorch peer at the same shapes (torch.compile bf16,
#           eager bf16, frozen eager bf16), in the same run; compile seconds and MFU of each of ours
#   train   the default `scripts/train.py` twice, from an empty and from a warm compile cache: wall time
#           by part, test metrics, compiled shapes
#   encode  encode() on the 12,808 Rotten Tomatoes snippets in float32 and bfloat16 (MFU of the packed
#           calls: the cached-embedding path runs the same pass) and sentence-transformers on the GPU, both
#   types   the step of each task type against classification's on the same packed tokens (retrieval's
#           in-batch negatives, tagging's per-token head, pairs), then the seven-type run on real text
#           (configs/types-embedded.yaml, bf16)
#   lora    our step under --freeze lora (MFU of the adapters' step)
#   gradcache  the retrieval step at 16x the batch in 16 chunks (--contrastive-chunk) against one chunk's
#           batch and the uncached 16x batch: temporary memory and speed
#   probe   our batch-256 step compiled in one process with no autotuning, with cuBLAS-only GEMMs (no Triton
#           GEMM tiles to autotune) and as it is, each program then timed: how much of a compile is
#           autotuning and what it buys
#   flags   the default run from an empty compile cache with cuBLAS-only GEMMs, then with no autotuning
# Usage: bash benchmarks/gpu.sh [PART ...]          (default: every part, in the order above)
# BUDGET (seconds, default 540): a part's item is skipped, and says so, when less time is left than it is
# expected to take; each runs under `timeout` of at most what is left. Results: $OUT/results.jsonl and
# $OUT/log.txt (on the device tool's machine $OUT comes back); runs and the compile cache go to $WORK.
# Within the device tool's 10-minute calls (BUDGET=540): `bash benchmarks/gpu.sh probe train flags` (what a
# compile costs and the default run's wall), then `bash benchmarks/gpu.sh gradcache types lora` (the steps and
# encode parts ran on an H200: benchmarks/results/gpu-nvidia-h200.jsonl).
# On a GPU machine with a package registry: `make install peer` (with a CUDA build of jax:
# `.venv/bin/pip install -U "jax[cuda12]"`), then `bash benchmarks/gpu.sh`. On one without a registry,
# bring a wheel folder with the project (a `.gpu/` folder holding them, the model and the data, with an
# `unpack.sh` that installs them) and `bash benchmarks/gpu_carry.sh` adds the three other corpora it reads and
# the wheels such an image may lack (its header says how the peer then runs on the image's own packages).
# Without a GPU it runs the same commands on the CPU at tiny sizes (a dry run of the script).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
PEER_PY=${PEER_PY:-$PY}
[ -x .peer/venv/bin/python ] && PEER_PY=.peer/venv/bin/python
OUT=${OUT:-/tmp/mtl_gpu_bench}; WORK=${WORK:-/tmp/mtl_gpu_work}; BUDGET=${BUDGET:-540}
mkdir -p "$OUT" "$WORK"; J=$OUT/results.jsonl; LOG=$OUT/log.txt; : > "$J"; : > "$LOG"
PARTS=${*:-steps train encode types lora probe flags gradcache}
if $PY -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
  SIZE=base; SEQ=128; BIG=256; SMALL=32; DEV=cuda; STEPS=20; LIMIT=(); TRAIN=(); TYPES=(--max-steps 300)
else
  SIZE=minilm; SEQ=16; BIG=8; SMALL=4; DEV=cpu; STEPS=3; LIMIT=(--limit 200); TRAIN=(--max-steps 30)
  TYPES=(--max-steps 10)
  echo "no GPU: a dry run on the CPU at tiny sizes" >&2
fi
DATA=$($PY -c "from mtl_jax.data.assets import embedded_data_file as f; print(f('rotten_tomatoes_corpus_full.csv.bz2'))")
MODEL=$($PY -c "from mtl_jax.data.assets import embedded_model_dir as f; print(f())")

# item NAME EXPECTED_S COMMAND...: its JSON lines into $J, its stderr into $LOG, or a line saying why not
item() {
  local name=$1 expected=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if (( left < expected )); then echo "{\"item\": \"$name\", \"skipped\": true, \"left_s\": $left}" >> "$J"; return 1; fi
  echo "== $name ($(date +%T), ${left}s left)" >> "$LOG"
  local t0=$SECONDS rc=0
  timeout $((left < 4 * expected ? left : 4 * expected)) "$@" >> "$J" 2>> "$LOG" || rc=$?
  echo "{\"item\": \"$name\", \"seconds\": $((SECONDS - t0)), \"rc\": $rc}" >> "$J"
  return $rc
}
OURS=(benchmarks/train_step.py --size $SIZE --seq $SEQ --steps $STEPS --dtype bfloat16)
PEER=(benchmarks/torch_mtl_step.py --size $SIZE --seq $SEQ --steps $STEPS --device $DEV --amp)
TRAIN_PY=(scripts/train.py --overwrite --no-progress --dtype bfloat16)
ENCODE=(benchmarks/encode.py --batch-size 256 "${LIMIT[@]}")
ST=(benchmarks/st_encode.py --data "$DATA" --model "$MODEL" --device $DEV --batch-size 256 "${LIMIT[@]}")
summary() {  # a run's summary.json as one JSON line: wall time by part, test metrics, compiled shapes
  $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print(json.dumps({'run': sys.argv[2], 'seconds': s['seconds'],
'examples_per_s': s['examples_per_s'], 'test': {t: {m['primary']: round(m[m['primary']], 4)} for t, m in s['test'].items()},
'shapes': s['compiled_shapes']}))" "$WORK/$1/summary.json" "$1" >> "$J" 2>> "$LOG"
}

for part in $PARTS; do
  case $part in
  steps)
    item "ours b$BIG mean" 70 $PY "${OURS[@]}" --batch $BIG --pooling mean
    item "ours b$BIG cls" 70 $PY "${OURS[@]}" --batch $BIG --pooling cls
    item "peer b$BIG compile" 60 $PEER_PY "${PEER[@]}" --batch $BIG --compile
    item "ours b$SMALL mean" 60 $PY "${OURS[@]}" --batch $SMALL --pooling mean
    item "peer b$SMALL eager" 30 $PEER_PY "${PEER[@]}" --batch $SMALL
    item "ours b$BIG frozen" 50 $PY "${OURS[@]}" --batch $BIG --pooling mean --freeze backbone
    item "peer b$BIG frozen" 30 $PEER_PY "${PEER[@]}" --batch $BIG --freeze-backbone ;;
  train)
    rm -rf "$WORK/xla"
    for cache in empty warm; do
      item "train, $cache compile cache" $([ $cache = empty ] && echo 120 || echo 60) \
        $PY "${TRAIN_PY[@]}" --out "$WORK/$cache" --compile-cache "$WORK/xla" "${TRAIN[@]}" && summary $cache
    done ;;
  encode)
    for dtype in float32 bfloat16; do item "encode $dtype" 40 $PY "${ENCODE[@]}" --dtype $dtype; done
    for dtype in float32 bfloat16; do item "st $dtype" 40 $PEER_PY "${ST[@]}" --dtype $dtype; done ;;
  types)
    item "types step" 150 $PY "${OURS[@]}" --batch $((BIG / 2)) --per-row 2 --pooling mean \
      --task-type classification pair_classification retrieval tagging
    item "types derive" 30 $PY scripts/derive_examples.py
    item "types run" 180 $PY "${TRAIN_PY[@]}" --out "$WORK/types" --config configs/types-embedded.yaml "${TYPES[@]}" \
      && summary types ;;
  lora)
    item "ours b$BIG lora" 70 $PY "${OURS[@]}" --batch $BIG --pooling mean --freeze lora ;;
  gradcache)
    item "gradcache b$BIG x16" 120 $PY benchmarks/gradcache.py --size $SIZE --rows $BIG --seq $SEQ --factor 16 \
      --dtype bfloat16 --steps 5 ;;
  probe)
    item "ours b$BIG mean, compile options" 150 $PY "${OURS[@]}" --batch $BIG --pooling mean \
      --compile-options autotune0 cublas default ;;
  flags)
    for flags in cublas:--xla_gpu_enable_triton_gemm=false autotune0:--xla_gpu_autotune_level=0; do
      rm -rf "$WORK/xla-${flags%%:*}"
      item "train, empty compile cache, XLA_FLAGS=${flags#*:}" 120 env XLA_FLAGS="${XLA_FLAGS:-} ${flags#*:}" \
        $PY "${TRAIN_PY[@]}" --out "$WORK/${flags%%:*}" --compile-cache "$WORK/xla-${flags%%:*}" "${TRAIN[@]}" \
        && summary "${flags%%:*}"
    done ;;
  *) echo "unknown part $part (steps train encode types lora probe flags gradcache)" >&2; exit 2 ;;
  esac
done
$PY benchmarks/gpu_table.py "$J" | tee "$OUT/table.md"
