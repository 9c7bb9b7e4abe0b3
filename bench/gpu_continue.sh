#!/usr/bin/env bash
# Continue tokengine-tiny runs (made by bench/gpu_train.sh) on a lent GPU, through the device
# tool, from the repo root, with the model directories carried along:
#   bash bench/gpu_continue.sh MODEL_DIR[:CACHE[:SEED]] ...
# (STAGE_C_MIN, LR, CACHE_SAMPLES, FAMILY_WEIGHTS, DEVICE override; DEVICE=cpu with tiny budgets
# tries it here)
# Each run is `python -m tokengine.train --init MODEL_DIR` with the model's variant and seed:
# stage c again from its weights (a fresh warm-up and cosine), on a cache of the grids its own
# ViT makes of the samples its first stage c saw. Runs naming the same CACHE share one cache
# (the first builds it); by default each has its own. A SEED other than the model's reseeds
# stage c alone (batch order, N_l and reducer draws) and names the run NAME-cont-seedSEED; it
# must share a cache built with the model's seed, since the cache's samples follow the seed of
# the run that builds it. Each run comes back as $OUT/NAME-cont[-seedSEED].tgz.
OUT=${OUT:-runs/gpu-continue}
R=/tmp/gpu-continue
STAGE_C_MIN=${STAGE_C_MIN:-3}
LR=${LR:-1e-3}
CACHE_SAMPLES=${CACHE_SAMPLES:-100000}
FAMILY_WEIGHTS=${FAMILY_WEIGHTS:-}  # e.g. counting=2,spatial=2,text=2,chart=2
# a new chain's second step: leave it unset; on the CPU, spatial 6 did not teach spatial relations
# and cost existence. Once existence, colour and shape are learned, give each family not yet
# learned a step of its own (e.g. spatial=100), then an unset one: on the CPU that taught spatial
# relations and charts where as many unset steps did not (not counting or text); keep an unset
# control beside it (bench/results/cpu-spatial-2026-11-28/)
DEVICE=${DEVICE:-cuda}
mkdir -p "$R"
source bench/gpu_env.sh
step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
WORKERS=${WORKERS:-$(shm_workers 4)}

step "continue $*: stage c ${STAGE_C_MIN} min at lr ${LR}, family weights '${FAMILY_WEIGHTS}'"
deadline=$((SECONDS + $(python3 -c "print(int(60 * $STAGE_C_MIN) + 100)")))
pids=()
names=()
builders=" "
for arg in "$@"; do
  IFS=: read -r dir cache_name run_seed <<< "$arg"
  cache=$R/cache-${cache_name:-$(basename "$dir")}
  read -r variant seed < <(python3 -c "import json; s = json.load(open('$dir/training.json'))
print(s['variant'], s['seed'])")
  name=$(basename "$dir")-cont${run_seed:+-seed$run_seed}
  names+=("$name")
  seed=${run_seed:-$seed}
  if [[ $builders == *" $cache "* ]]; then  # another run builds this cache: wait for it
    while [ ! -f "$cache/meta.json" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
  fi
  builders+="$cache "
  timeout $((deadline - SECONDS)) python3 -m tokengine.train --device "$DEVICE" \
    --workers "$WORKERS" --threads 2 --init "$dir" --variant "$variant" --seed "$seed" \
    --output "$R/$name" --cache "$cache" --tokens 1,1,4,4,16,16,64,64,144,256,576 \
    --cache-samples "$CACHE_SAMPLES" --minutes "$STAGE_C_MIN" --lr "$LR" --batch-size 256 \
    ${FAMILY_WEIGHTS:+--family-weights "$FAMILY_WEIGHTS"} --val-every 1 --save-every 2000 \
    > "$R/$name.log" 2>&1 && echo "[${SECONDS}s] $name done" || echo "[${SECONDS}s] $name failed" &
  pids+=($!)
done
wait "${pids[@]}"

step "results"
for name in "${names[@]}"; do
  grep -a "stage b:\|final val\|Error" "$R/$name.log" | cut -c1-300
  cp "$R/$name.log" "$R/$name/" 2>/dev/null
  tar -C "$R" -czf "$OUT/$name.tgz" --exclude train_state.pt "$name"
done
step "done"
