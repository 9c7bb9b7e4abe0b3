#!/usr/bin/env bash
# One-shot GPU check for a session lent a GPU (run through the device tool from the repo root):
# builds tokengine._C with the CUDA ops, runs the op and model tests on CUDA for the cuda and
# triton backends, runs the benchmarks, and leaves logs + a JSON of the benchmarks in $OUT.
# Budget: about 10 minutes on an H100. Commit what it prints under bench/results/ with the
# card's name, the date and this command.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
pip install -q torch ninja setuptools wheel 2>&1 | tail -2
TOKENGINE_FORCE_CUDA=1 MAX_JOBS=16 pip install -q --no-build-isolation -e ".[test]" \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python -m tokengine.info --require reference,triton,cuda | tee "$OUT/info.txt"
# correctness: every backend on CUDA against the float64 truth (test files pick cuda when present)
timeout 300 python -m pytest tests/test_token_pool.py tests/test_qc_attention.py \
  tests/test_models.py tests/test_engine.py -q -x 2>&1 | tee "$OUT/tests.log" | tail -15
# performance: ops and engine beside their baselines
timeout 240 python -m pytest bench/ --benchmark-only -q --benchmark-json="$OUT/bench.json" \
  --benchmark-max-time=0.5 2>&1 | tee "$OUT/bench.log" | grep -A80 "group / entry"
