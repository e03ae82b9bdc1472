#!/usr/bin/env bash
# One call on a lent GPU (the device tool; see bench/README.md): build the extension against the
# machine's torch, run the GPU tests and the GPU benchmark, and leave everything under $OUT
# (default bench/results/gpu-run) for committing under bench/results/.
#   device run: bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
# The image has no internet: no build isolation, no dependencies fetched.
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python -m pytest -q tests -x -p no:cacheprovider > "$OUT/tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/tests.txt"
tail -5 "$OUT/tests.txt"
for dtype in float16 float32; do
  python bench/fused_vs_ref.py --device cuda --dtype "$dtype" --channels-last --batch 1 64 256 \
    --no-train --out "$OUT/cuda-$dtype-channels-last.json" > "$OUT/cuda-$dtype-channels-last.md" \
    2> "$OUT/cuda-$dtype-channels-last.log"
  echo "bench $dtype rc=$?"
done
ls -l "$OUT"
