#!/usr/bin/env bash
# One call on a lent GPU (the device tool; see bench/README.md): build the extension against the
# machine's torch, run the GPU tests and the GPU benchmark, and leave everything under $OUT
# (default bench/results/gpu-run) for committing under bench/results/.
#   device run: bash bench/gpu_session.sh
# Each step has a time limit, so one slow step cannot eat the session's device time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
# The image has no internet: no build isolation, no dependencies fetched.
MAX_JOBS=16 timeout 240 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
# The GPU suites (Triton and CUDA backends, parity at real sizes, compile) and every gpu-marked test.
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_cuda.py \
  > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/tests.txt"
tail -5 "$OUT/tests.txt"
# The issue's configuration first: fp16 channels_last, batch 1 / 64 / 256, with the dense
# Conv-BN-ReLU, torch.compile(ref) and each backend / eval form beside ghostops.
timeout 330 python bench/fused_vs_ref.py --device cuda --dtype float16 --channels-last \
  --batch 1 64 256 --no-train --module-variants --out "$OUT/cuda-float16-channels-last.json" \
  > "$OUT/cuda-float16-channels-last.md" 2> "$OUT/cuda-float16-channels-last.log"
echo "bench float16 rc=$?"
timeout 120 python bench/fused_vs_ref.py --device cuda --dtype float32 --channels-last \
  --batch 64 256 --no-train --out "$OUT/cuda-float32-channels-last.json" \
  > "$OUT/cuda-float32-channels-last.md" 2> "$OUT/cuda-float32-channels-last.log"
echo "bench float32 rc=$?"
ls -l "$OUT"
