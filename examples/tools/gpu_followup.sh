#!/usr/bin/env bash
# Follow-ups to stop 19's GPU check (issue 5), one command of about 5 minutes on one H100/H200:
#   1. which kernel-mode route sums the patch Gram closer to fp64 on the GPU, at calibration's
#      chunk (64 samples) and at 512 (the two routes' Grams were 3.2e-5 apart on an H200 at
#      512, 6.6e-8 on a CPU): examples/benchmarks/bench_displaced.py prints each route's error;
#   2. resnet18 224x224 kernel mode at N = 64 and 256, this tree against the first GPU run's
#      code (b9b1802), in alternating processes on one instance: stop 19 measured it 1.3-1.4x
#      slower than that run, but on another instance (instances differed by up to 1.6x).
# Prepare on a machine with the repository (the device machine gets the working tree only):
#   mkdir -p .ab/first && git archive b9b1802 | tar -x -C .ab/first
# and carry .ab and .whl (torch-pruning's wheel, see gpu_env.sh).
# Usage: examples/tools/gpu_followup.sh [output dir]      (default gpu_followup_out/)
#        DEVICE=cpu examples/tools/gpu_followup.sh         (a dry run of the same steps on a CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_followup_out}
device=${DEVICE:-cuda}
mkdir -p "$out"
if [ "$device" = cuda ]; then source examples/tools/gpu_env.sh; fi
samples=(64 512) && [ "$device" = cpu ] && samples=(4)
for n in "${samples[@]}"; do
    timeout 120 python -m examples.benchmarks.bench_displaced --device "$device" --samples "$n" 2>&1 \
        | tee "$out/displaced_$n.txt"
done
if [ ! -d .ab/first ]; then
    echo "no .ab/first: skipping the A/B against b9b1802 (see the header)"
    exit 0
fi
old=/tmp/fxkd-first && rm -rf "$old" && mkdir -p "$old/fxkd"  # the old tree as package fxkd
cp -r .ab/first/fxkd/. "$old/fxkd/" && cp -r .ab/first/passes "$old/fxkd/passes"
size=224 limit=150 runs=(64 256) && [ "$device" = cpu ] && size=64 limit=900 runs=(8)
for round in 1 2; do
    for tree in first this; do
        path=${PYTHONPATH:-} script=examples/benchmarks/bench_calibration.py  # as installed
        if [ "$tree" = first ]; then
            path=$old${PYTHONPATH:+:$PYTHONPATH} script=.ab/first/examples/bench_calibration.py
        fi
        echo "== round $round: $tree tree ($script)"
        PYTHONPATH=$path python3 -P -c "import fxkd.passes as p; print('fxkd.passes:', p.__file__)"
        PYTHONPATH=$path timeout "$limit" python3 \
            "$script" --pairs resnet18 --size "$size" --samples "${runs[@]}" --modes kernel \
            --device "$device" --repeats 3 --no-memory 2>&1 | grep -v "sample rows" \
            | tee -a "$out/ab_resnet18_kernel.txt"
        echo "exit status ${PIPESTATUS[0]} (124: the time limit)" \
            | tee -a "$out/ab_resnet18_kernel.txt"
    done
done
