#!/usr/bin/env bash
# The full Fashion-MNIST grid of issue 4 (2 teachers x 4 students x N in {10,50,100,500} x
# 3 seeds x every method) on one GPU: one process per teacher/student pair, all at once, then
# merged into one table (fashion_mnist_<tag>.md/.json/.png). Each process times its methods
# against its own fxkd-kernel run, so the time ratios are side by side under the same load.
# Usage: examples/tools/gpu_fashion.sh [output dir]         (default gpu_fashion_out/)
# Environment: DEVICE (cuda), LIMIT seconds per process (480), SAMPLES, SEEDS, METHODS, TAG (gpu),
# FXKD_DATA (the four IDX files, e.g. a copy of /usr/share/datasets/fashion-mnist).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_fashion_out}
mkdir -p "$out"
DEVICE=${DEVICE:-cuda}
[ "$DEVICE" = cpu ] || source examples/tools/gpu_env.sh
start=$SECONDS
pids=()
for teacher in vgg resnet; do
    for student in ${STUDENTS:-l1-50 l1-75 slim-50 decouple-r1}; do
        OMP_NUM_THREADS=2 timeout "${LIMIT:-480}" python -m examples.benchmarks.fashion_mnist \
            --device "$DEVICE" --teachers "$teacher" --students "$student" \
            --samples ${SAMPLES:-10 50 100 500} --seeds ${SEEDS:-0 1 2} \
            ${METHODS:+--methods $METHODS} --tag "shard-$teacher-$student" --out "$out/shards" \
            > "$out/log-$teacher-$student.txt" 2>&1 &
        pids+=($!)
    done
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "grid: $((SECONDS - start)) s"
grep -h "acc " "$out"/log-*.txt | sort | tail -n 5
shopt -s nullglob
python -m examples.benchmarks.fashion_mnist --from-json "$out"/shards/fashion_mnist_shard-{vgg,resnet}-*.json \
    --tag "${TAG:-gpu}" --out "$out" > "$out/merge.txt" 2>&1 || tail -20 "$out/merge.txt"
echo "total: $((SECONDS - start)) s"
