"""What the memory options cost in accuracy: spatial subsampling of the normal equations' rows
on the Fashion-MNIST pairs (shipped VGG and ResNet teachers, students L1-pruned 50% as in
examples/benchmarks/fashion_mnist.py), against the full rows, in one run.

    python -m examples.benchmarks.memory_options                     # N=100, 3 seeds, both modes
    python -m examples.benchmarks.memory_options --shares 1 0.5 0.25 0.1 --samples 100 500

Per teacher, mode and share: test accuracy on the 10,000 test images (mean ± std over seeds,
the same samples per seed as the benchmark), calibration time as a ratio to the full-rows run,
and the estimated per-chunk working memory (what subsampling shrinks; fxkd.passes.memory). Writes
examples/benchmarks/results/memory_options.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fxkd
from examples.benchmarks.fashion_mnist import load_splits, make_students, sample_indices
from fxkd.cli.demo import accuracy, load_teacher

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=["vgg", "resnet"])
    p.add_argument("--modes", nargs="+", default=["kernel", "pointwise"])
    p.add_argument("--shares", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--samples", nargs="+", type=int, default=[100])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS / "memory_options.md"))
    args = p.parse_args()
    torch.manual_seed(0)
    data = load_splits(args.data_dir)
    pool, test = data.pool_x, data.test
    lines = [
        "# Spatial subsampling of the normal equations: accuracy and cost",
        "",
        f"`python {' '.join(['examples/benchmarks/memory_options.py', *sys.argv[1:]])}` "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads). Students L1-pruned 50%;"
        " test accuracy on 10,000 images, mean ± std over seeds; time = calibration (compress"
        " end to end) relative to share 1.0 in the same run; working = estimated per-chunk"
        " buffers.",
        "",
        "| teacher | mode | N | share | accuracy % | time ratio | working MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tname in args.teachers:
        teacher = load_teacher(tname)
        student = make_students(teacher, pool[:1], (0.5, 0.75))["l1-50"]
        for mode in args.modes:
            for n in args.samples:
                base = None
                for share in args.shares:
                    accs, secs, working = [], [], 0
                    for seed in args.seeds:
                        idx = sample_indices(len(pool), n, seed)
                        start = time.perf_counter()
                        result = fxkd.compress(
                            teacher,
                            student,
                            pool[idx],
                            num_samples=n,
                            mode=mode,
                            subsample=share,
                            seed=seed,
                            progress=False,
                        )
                        secs.append(time.perf_counter() - start)
                        accs.append(100 * accuracy(result.model, *test))
                        working = result.memory.working
                    t = statistics.median(secs)
                    base = base or t
                    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                    row = (
                        f"| {tname} | {mode} | {n} | {share:g} | {statistics.mean(accs):.2f} ± "
                        f"{std:.2f} | {t / base:.2f} | {working / 2**20:.1f} |"
                    )
                    print(row, flush=True)
                    lines.append(row)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
