#!/usr/bin/env bash
# Train tokengine-tiny on a lent GPU, through the device tool, from the repo root:
#   bash bench/gpu_train.sh      (VISION_MIN, STAGE_C_MIN, CACHE_SAMPLES, RUNS, FAMILY_WEIGHTS,
#   BATCH_SIZE, LR, WARMUP, DEVICE override; with DEVICE=cpu and tiny budgets the script itself
#   can be tried on a CPU)
# Uses the machine's own python3 (no network there), like bench/gpu_run.sh. After a smoke run of
# every stage on CUDA, the runs named in RUNS (default: the first five below) of
# `python -m tokengine.train --device cuda` share the one GPU:
#   A       fusion, seed 0, stages a + b + c (builds cache A)      <- the candidate to ship
#   B, C, D the same command, each with its own cache              <- from-scratch reruns
#   A-seed1 fusion, seed 1, stage c on cache A                     <- another seed
#   A-noq   fusion-noq, seed 0, stage c on cache A                 <- the question-free pair
#   A-b64   fusion, seed 0, batch 64 (the CPU recipe's), cache A   <- batch size vs steps
#   A-select fusion, seed 0, --select-image, stage c on cache A   <- does N_l=1 then score lower?
# FAMILY_WEIGHTS (e.g. counting=2,spatial=6,text=2,chart=2) is passed to every run's stage c;
# from scratch, leave it unset: on the CPU, 2,400 steps without weights scored 0.598 against
# 0.546 with those (bench/results/cpu-spatial-2026-11-28/).
# Each model directory (with its log) comes back as a .tgz under $OUT; score them on the test
# split where they land (python -m tokengine.eval or tokengine.training.scoring.evaluate_split),
# not on the device.
OUT=${OUT:-runs/gpu-train}
R=/tmp/gpu-train  # caches (GiBs) stay on the machine
VISION_MIN=${VISION_MIN:-2}
STAGE_C_MIN=${STAGE_C_MIN:-4}
CACHE_SAMPLES=${CACHE_SAMPLES:-100000}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-A B A-seed1 A-noq A-b64}
FAMILY_WEIGHTS=${FAMILY_WEIGHTS:-}
# stage c's batch (fewer samples at large N_l), peak learning rate and warm-up steps; on the
# H100, 64 and 256 samples a step ran at the same 18-19 steps/s (launch-bound)
BATCH_SIZE=${BATCH_SIZE:-256}
LR=${LR:-2e-3}
WARMUP=${WARMUP:-100}
mkdir -p "$R"
source bench/gpu_env.sh
for name in $RUNS; do  # the runs on cache A need A to build it
  case $name in
    A | B | C | D) ;;
    A-seed1 | A-noq | A-b64 | A-select)
      [[ " $RUNS " == *" A "* ]] || { echo "RUNS: $name needs A"; exit 2; } ;;
    *) echo "RUNS: unknown run $name (A B C D A-seed1 A-noq A-b64 A-select)"; exit 2 ;;
  esac
done

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
echo "cpus $(nproc)"
df -m /dev/shm
WORKERS=${WORKERS:-$(shm_workers 6)}
echo "workers $WORKERS"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__)"

step "smoke: every stage on CUDA for a few steps"
timeout 150 python3 -m tokengine.train --device "$DEVICE" --workers "$WORKERS" --output "$R/smoke" \
  --cache "$R/smoke-cache" --vision-steps 3 --vision-batch-size 64 --cache-samples 1024 \
  --val-samples 128 --steps 20 --batch-size 256 --val-every 0 --save-every 10 --seed 0 \
  > "$OUT/smoke.log" 2>&1 || { tail -40 "$OUT/smoke.log"; exit 1; }
grep -a "stage\|final\|done" "$OUT/smoke.log"

step "train $RUNS: stage a ${VISION_MIN} min, ${CACHE_SAMPLES} cached grids, stage c ${STAGE_C_MIN} min (batch $BATCH_SIZE, lr $LR, warm-up $WARMUP), family weights '${FAMILY_WEIGHTS}'"
common=(--device "$DEVICE" --workers "$WORKERS" --threads 2 --tokens 1,1,4,4,16,16,64,64,144,256,576
  --vision-minutes "$VISION_MIN" --vision-batch-size 128 --cache-samples "$CACHE_SAMPLES"
  --minutes "$STAGE_C_MIN" --batch-size "$BATCH_SIZE" --lr "$LR" --warmup "$WARMUP"
  --val-every 1 --save-every 2000
  ${FAMILY_WEIGHTS:+--family-weights "$FAMILY_WEIGHTS"})
# every run ends by one deadline, so that the models and logs are packed before the call's limit
deadline=$((SECONDS + $(python3 -c "print(int(60 * ($VISION_MIN + $STAGE_C_MIN)) + 100)")))
train() {
  local name=$1
  shift
  timeout $((deadline - SECONDS)) python3 -m tokengine.train --output "$R/$name" "$@" \
    > "$R/$name.log" 2>&1
  echo "[${SECONDS}s] $name exited $?"
}
pids=()
for name in $RUNS; do  # the from-scratch runs first: A builds cache A, the others wait for it
  case $name in A | B | C | D) ;; *) continue ;; esac
  train "$name" --variant fusion --cache "$R/cache$name" --seed 0 "${common[@]}" &
  pids+=($!)
done
if [[ " $RUNS " == *" A-"* ]]; then
  while [ ! -f "$R/cacheA/meta.json" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
  step "cache A ready"
fi
for name in $RUNS; do
  case $name in
    A-seed1) train "$name" --variant fusion --cache "$R/cacheA" --seed 1 "${common[@]}" & ;;
    A-noq) train "$name" --variant fusion-noq --cache "$R/cacheA" --seed 0 "${common[@]}" & ;;
    A-b64) train "$name" --variant fusion --cache "$R/cacheA" --seed 0 "${common[@]}" \
      --batch-size 64 & ;;
    A-select) train "$name" --variant fusion --cache "$R/cacheA" --seed 0 "${common[@]}" \
      --select-image & ;;
    *) continue ;;
  esac
  pids+=($!)
done
(while sleep 30; do
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null; done) &
sampler=$!
wait "${pids[@]}"
kill "$sampler"

step "results"
for name in $RUNS; do
  grep -a "stage a:\|stage b:\|final val\|Error\|error" "$R/$name.log" | cut -c1-400
  cp "$R/$name.log" "$R/$name/" 2>/dev/null
  cp "$R/cache${name:0:1}/meta.json" "$R/$name/cache_meta.json" 2>/dev/null
  tar -C "$R" -czf "$OUT/$name.tgz" --exclude train_state.pt "$name"
done
step "done"
