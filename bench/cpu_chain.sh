#!/usr/bin/env bash
# Train tokengine-tiny from scratch on the CPU in seven `python -m tokengine.train` steps, in the
# order the CPU experiments found to teach spatial relations and charts
# (bench/results/cpu-spatial-2026-11-28/): from the repo root,
#   bash bench/cpu_chain.sh DIR [SEED]
# (THREADS overrides the torch threads, 1 by default: the weights depend on it, and two chains
# side by side on 2 cores run one each.) Step counts, not minutes, set every budget, so a chain
# run with the same SEED and THREADS ends with the same weights. Every step saves its state and
# is run with --resume, so the script, run again after a kill, goes on where it stopped; steps
# already done (their training.json written) are skipped; bench/cpu_chain_state.sh carries that
# state to a new machine where the disk does not outlive a session.
# Partners of a chain on its ViT: CACHE=OTHER/cache trains on another chain's cached grids
# (stage a and b are then skipped), VARIANT=fusion-noq withholds the question (the paper's
# ablation), SELECT=1 gives s1 a reducer whose tokens are mixes of image tokens
# (train --select-image; later steps keep the reducer they continue).
#   s1: stage a (2,211 steps x 128 images, as `A-cont7`'s first GPU step), stage b
#       (50,000 cached grids in DIR/cache), stage c 2,400 steps at lr 2e-3, every family alike
#   s2: 2,400 more steps at lr 1e-3, every family alike (existence, colour, shape learned)
#   s3: 1,500 steps of spatial questions (spatial=100), s4: 1,500 steps every family alike
#   s5: 1,500 steps of chart questions (chart=100), s6: 1,500 steps every family alike
#   s7: 6,000 steps with counting, spatial, text and chart questions drawn more often (the mix of
#       `A-cont7`'s last step; added before s6 was scored, see
#       bench/results/cpu-chain-2026-11-28/README.md)
set -euo pipefail
DIR=${1:?usage: bash bench/cpu_chain.sh DIR [SEED]}
SEED=${2:-0}
THREADS=${THREADS:-1}
CACHE=${CACHE:-$DIR/cache}
VARIANT=${VARIANT:-fusion}
SELECT_S1=()
if [ "${SELECT:-0}" = 1 ]; then SELECT_S1=(--select-image); fi
mkdir -p "$DIR"
COMMON=(--variant "$VARIANT" --seed "$SEED" --cache "$CACHE" --cache-samples 50000
  --tokens 1,1,4,4,16,16,64,64,144,256,576 --batch-size 256 --warmup 100 --threads "$THREADS"
  --val-every 6 --save-every 200 --resume)

run_step() {  # NAME FROM ARGS...: one step, unless it is done
  local name=$1 from=$2
  shift 2
  if [ -f "$DIR/$name/training.json" ]; then
    echo "$name: done before"
    return
  fi
  echo "$name: started $(date -u '+%F %T') UTC"
  python -m tokengine.train "${COMMON[@]}" ${from:+--init "$DIR/$from"} --output "$DIR/$name" \
    "$@" >> "$DIR/$name.log" 2>&1
  echo "$name: done $(date -u '+%F %T') UTC"
}

run_step s1 "" --vision-steps 2211 --vision-batch-size 128 --steps 2400 --lr 2e-3 \
  ${SELECT_S1[@]+"${SELECT_S1[@]}"}
run_step s2 s1 --steps 2400 --lr 1e-3
run_step s3 s2 --steps 1500 --lr 1e-3 --family-weights spatial=100
run_step s4 s3 --steps 1500 --lr 1e-3
run_step s5 s4 --steps 1500 --lr 1e-3 --family-weights chart=100
run_step s6 s5 --steps 1500 --lr 1e-3
run_step s7 s6 --steps 6000 --lr 1e-3 --family-weights counting=2,spatial=6,text=2,chart=2
