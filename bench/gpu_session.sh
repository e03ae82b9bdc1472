#!/usr/bin/env bash
# One call on a lent GPU (the device tool; see bench/README.md): build the extension against the
# machine's torch, run the GPU tests and the GPU benchmark, and leave everything under $OUT
# (default bench/results/gpu-run) for committing under bench/results/.
#   device run (timeout_s 600): bash bench/gpu_session.sh
# The steps' limits add up to 570 s, inside one 600 s device command; every step writes its log
# as it goes (the benchmark's progress lines carry each row's timings), so a step cut short
# still leaves its rows. The extension is built for sm_90 only (the lent GPUs are Hopper), half
# the compile time. Not here, for lack of device time: the training benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
# The image has no internet: no build isolation, no dependencies fetched.
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 150 \
  pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
# The GPU suites: Triton and CUDA backends, parity at real sizes (not the compile-for-sm_90
# checks, which need no GPU and run in CI), each file on its own with a bounded number of
# failures, so a failing backend neither hides the other's results nor takes all the time.
for suite in triton cuda; do
  timeout 55 python -m pytest -q --maxfail=5 -p no:cacheprovider "tests/test_$suite.py" \
    -k "not compile_for" > "$OUT/tests-$suite.txt" 2>&1
  echo "tests $suite rc=$?" >> "$OUT/tests-$suite.txt"
  tail -5 "$OUT/tests-$suite.txt"
done
# compute-sanitizer on small runs of the CUDA kernels (float16; "not bf16": -k matches
# substrings): memcheck over eval in channels_last (both forms) and training, racecheck over
# that eval (its kernels share memory between threads).
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
timeout 50 "$SANITIZER" --tool memcheck --error-exitcode 3 python -m pytest -q -x \
  -p no:cacheprovider tests/test_cuda.py -k "(eval_matches_reference and f16 and not bf16 \
  and cl) or (training_matches_reference and f16 and not bf16 and not real_sizes)" \
  > "$OUT/memcheck.txt" 2>&1
echo "memcheck rc=$?" | tee -a "$OUT/memcheck.txt"
timeout 40 "$SANITIZER" --tool racecheck --error-exitcode 3 python -m pytest -q -x \
  -p no:cacheprovider tests/test_cuda.py -k "eval_matches_reference and f16 and not bf16 and cl" \
  > "$OUT/racecheck.txt" 2>&1
echo "racecheck rc=$?" | tee -a "$OUT/racecheck.txt"
# The issue's configuration: fp16 channels_last at batch 256, every shape, with the dense
# Conv-BN-ReLU, torch.compile(ref) and each backend / eval form beside ghostops.
timeout 150 python bench/fused_vs_ref.py --device cuda --dtype float16 --channels-last \
  --batch 256 --min-run-time 0.1 --no-train --no-model --module-variants \
  --out "$OUT/cuda-float16-channels-last-b256.json" \
  > "$OUT/cuda-float16-channels-last-b256.md" 2> "$OUT/cuda-float16-channels-last-b256.log"
echo "bench b256 rc=$?"
# Batch 1 and 64, and the whole GhostNet-1.0x (eager reference vs ghostops) at 1 and 256.
timeout 70 python bench/fused_vs_ref.py --device cuda --dtype float16 --channels-last \
  --batch 1 64 --min-run-time 0.1 --no-train --model-batch 1 256 --no-compare \
  --out "$OUT/cuda-float16-channels-last.json" \
  > "$OUT/cuda-float16-channels-last.md" 2> "$OUT/cuda-float16-channels-last.log"
echo "bench b1/b64/model rc=$?"
ls -l "$OUT"
