#!/usr/bin/env bash
# One-shot GPU check for a session lent a GPU, run through the device tool from the repo root:
#   bash bench/gpu_run.sh        (logs and JSON under $OUT, default bench/results/gpu-DATE)
# The lent machines have no network, so this uses the machine's own python3 (torch, triton,
# transformers, pytest-xdist installed) with no virtualenv, and builds tokengine._C in place.
# Steps, most important first, each under its own time limit (4.5 minutes on an H100):
# build with CUDA (sm_90) -> op, model-parity and compiled-Engine tests on CUDA -> the
# kernel-core issue's GPU goals (bench/gpu_goals.py) -> TTFT per N_l at LLaVA-1.5-7B shapes
# (bench/llava7b_ttft.py) -> the shipped tokengine-tiny's accuracy on CUDA -> the pytest
# benchmark table.
# Commit what it prints under bench/results/ with the card's name, the date and this command.
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d)}
# At most 8 files come back from the device: run.log (everything printed), build.log,
# tests.log, goals.json, ttft.json, eval.json, bench.json.
source bench/gpu_env.sh

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'triton', triton.__version__, 'transformers', t.__version__)"

step "build tokengine._C with the CUDA ops"
# torch looks for the CUDA toolkit beside `which nvcc`; a wrapper in /usr/local/bin misleads it.
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
TOKENGINE_FORCE_CUDA=1 TOKENGINE_CUDA_ARCHS=90 MAX_JOBS=16 timeout 300 \
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || tail -30 "$OUT/build.log"
python3 -m tokengine.info

step "op tests, model parity and the compiled Engine on CUDA (every backend, every dtype)"
timeout 240 python3 -m pytest tests/test_token_pool.py tests/test_qc_attention.py \
  tests/test_models.py "tests/test_engine.py::test_compiled_decode_gives_the_same_answers" \
  -q -rfE -n 8 -p no:cacheprovider > "$OUT/tests.log" 2>&1
tail -25 "$OUT/tests.log"

step "GPU goals: token_pool vs copy bandwidth, qc_cross_attention vs cat + SDPA (bf16)"
timeout 90 python3 bench/gpu_goals.py --json "$OUT/goals.json"

step "TTFT per N_l, LLaVA-1.5-7B shapes, float16, random weights"
timeout 120 python3 bench/llava7b_ttft.py --repeats 5 --json "$OUT/ttft.json"

step "shipped tokengine-tiny on CUDA (the CPU gives 80.1% at N_l=256)"
timeout 90 python3 -m tokengine.eval --tokens 256 --device cuda --output /tmp/tokengine-eval \
  && cp /tmp/tokengine-eval/results.json "$OUT/eval.json"

step "benchmark table (float16)"
timeout 80 python3 -m pytest bench/test_bench_ops.py bench/test_bench_engine.py \
  --benchmark-only -q -p no:cacheprovider --benchmark-max-time=0.2 -k "not compiled" \
  --benchmark-json="$OUT/bench.json" 2>&1 | grep -A80 "group / entry"
step "done"
