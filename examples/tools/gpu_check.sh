#!/usr/bin/env bash
# The GPU check of issue 5, one command (under 8 minutes on one H100/H200; 6.2 min on an H200
# in stop 19, when 90 s and 45 s limits cut the last rows of resnet18 and the small pairs):
#   1. prints the card's name;
#   2. runs the tests marked `cuda` (offload, TF32 off, teacher/student on two devices, ...);
#   3. runs the cost benchmark for torchvision resnet50 (teacher) and an internally pruned
#      student at 224x224, N=512, both modes, with offload and peak memory, then the small
#      pairs and resnet18 at N = 64, 256, 1024 as time allows;
#   4. times kernel mode's patch Gram as im2col + GEMM against displaced products on the GPU
#      (fxkd.solve.displaced.DEVICES lists "cuda" only once this says they pay there).
# Usage: examples/tools/gpu_check.sh [output dir]      (default gpu_check_out/)
# On a machine without network: put wheels of missing dependencies (torch-pruning) in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check_out}
mkdir -p "$out"
source examples/tools/gpu_env.sh
start=$SECONDS
python3 -P -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 | tee "$out/tests.txt"
echo "tests: $((SECONDS - start)) s"
timeout 200 python -m examples.benchmarks.bench_calibration --pairs resnet50 --size 224 --samples 512 \
    --device cuda --offload --repeats 3 --json "$out/bench_resnet50.json" 2>&1 \
    | tee "$out/bench_resnet50.txt"
echo "resnet50: $((SECONDS - start)) s"
timeout 120 python -m examples.benchmarks.bench_calibration --pairs resnet18 --size 224 \
    --samples 64 256 1024 --device cuda --offload --repeats 3 --json "$out/bench_resnet18.json" \
    2>&1 | tee "$out/bench_resnet18.txt"
timeout 60 python -m examples.benchmarks.bench_calibration --samples 64 256 1024 --device cuda \
    --repeats 3 --json "$out/bench_small.json" 2>&1 | tee "$out/bench_small.txt"
timeout 60 python -m examples.benchmarks.bench_displaced --device cuda --samples 512 2>&1 \
    | tee "$out/bench_displaced.txt"
echo "total: $((SECONDS - start)) s"
