# Sourced by bench/gpu_*.sh, which run through the device tool from the repo root: the machine's
# own python3 (no network there, so no virtualenv) with the checkout on PYTHONPATH, and
# everything printed also written to $OUT/run.log.
# shellcheck shell=bash
set -uo pipefail
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/bench" PYTHONDONTWRITEBYTECODE=1
# kernels/ is installed as tokengine.kernels; with the checkout on PYTHONPATH a link stands in.
[ -e tokengine/kernels ] || ln -s ../kernels tokengine/kernels
exec > >(tee "$OUT/run.log") 2>&1
step() { echo; echo "=== [${SECONDS}s] $*"; }
# DataLoader workers hand batches over in shared memory: $1 of them, none where /dev/shm is small
shm_workers() { [ "$(df -m --output=size /dev/shm | tail -1)" -ge 4096 ] && echo "$1" || echo 0; }
