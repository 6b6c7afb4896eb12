"""How many polish steps does the closed form need to beat MiR, and at what share of MiR's time?

    python -m examples.benchmarks.polish_budget  # VGG + ResNet, L1 50/75 %, N=100
    python -m examples.benchmarks.polish_budget --teachers vgg --students l1-50 --seeds 0

For each teacher/student of the Fashion-MNIST benchmark (fashion_mnist.py: the same
students, the same samples per seed, the same held-out slice), it runs fxkd's kernel-mode closed
form, then fxkd.polish for the largest checkpoint at each learning rate, evaluating the student
at every checkpoint on the held-out slice and on the test set (evaluation time excluded from the
polish's clock). The learning rate at each step budget is picked on the held-out slice (mean over
seeds), never on the test set. MiR (the benchmark's own implementation and selection rule) runs
on the first seed's samples in the same process, so the time ratios are side by side.
Writes examples/benchmarks/results/polish_budget.md and .json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

import fxkd
from examples.benchmarks.fashion_mnist import (
    RESULTS,
    _machine,
    _sync,
    load_splits,
    make_students,
    run_method,
    sample_indices,
)
from fxkd.cli.demo import accuracy, load_teacher

log = logging.getLogger("polish_budget")


def budget_curve(teacher, student, samples, val, test, seed, lrs, checkpoints):
    """{(lr, steps): (val acc, test acc, seconds of kernel + polish up to steps)}."""
    _sync(samples.device)
    start = time.perf_counter()
    closed = fxkd.compress(
        teacher, student, samples, mode="kernel", num_samples=len(samples), progress=False
    )
    _sync(samples.device)
    kernel_s = time.perf_counter() - start
    out = {(0.0, 0): (accuracy(closed.model, *val), accuracy(closed.model, *test), kernel_s)}
    for lr in lrs:
        paused = 0.0
        _sync(samples.device)
        begin = time.perf_counter()

        def callback(step, model, lr=lr, begin=begin):
            nonlocal paused
            if step not in checkpoints:
                return
            _sync(samples.device)
            now = time.perf_counter()
            elapsed = now - begin - paused
            out[(lr, step)] = (accuracy(model, *val), accuracy(model, *test), kernel_s + elapsed)
            paused += time.perf_counter() - now

        fxkd.polish(
            teacher,
            closed.model,
            samples,
            closed.alignment,
            steps=max(checkpoints),
            lr=lr,
            seed=seed,
            progress=False,
            callback=callback,
        )
    return out, kernel_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=["vgg", "resnet"])
    p.add_argument("--students", nargs="+", default=["l1-50", "l1-75"])
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3])
    p.add_argument("--checkpoints", nargs="+", type=int, default=[10, 25, 50, 100, 200])
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fxkd").setLevel(logging.WARNING)
    command = "python -m examples.benchmarks.polish_budget " + " ".join(argv or sys.argv[1:])
    device = torch.device(args.device)
    data = load_splits(args.data_dir, device)
    pool, pool_y, val, test = data.pool_x, data.pool_y, data.val, data.test
    n, checkpoints = args.samples, set(args.checkpoints)
    cells = []
    for tname in args.teachers:
        teacher = load_teacher(tname)
        students = make_students(teacher, pool[:1].cpu(), (0.5, 0.75))
        teacher = teacher.to(device)
        for sname in args.students:
            student = students[sname].to(device)
            if not cells:  # first-call costs (tracing, autograd, Adam) off every clock
                warm = fxkd.compress(teacher, student, pool[:16], num_samples=16, progress=False)
                fxkd.polish(teacher, warm.model, pool[:16], warm.alignment, steps=2, progress=False)
            for seed in args.seeds:
                idx = sample_indices(len(pool), n, seed).to(device)  # the benchmark's samples
                curve, kernel_s = budget_curve(
                    teacher, student, pool[idx], val, test, seed, args.lrs, checkpoints
                )
                cell = {"teacher": tname, "student": sname, "seed": seed, "kernel_s": kernel_s}
                cell["curve"] = [[lr, s, *v] for (lr, s), v in sorted(curve.items())]
                if seed == args.seeds[0]:
                    mir = run_method(
                        "mir", teacher, student, pool[idx], pool_y[idx], val, test, seed, {}
                    )
                    cell["mir"] = mir["acc"], mir["seconds"]
                    log.info("%s %s seed=%d mir %.4f %.1fs", tname, sname, seed, *cell["mir"])
                for lr, s, v, t, sec in cell["curve"]:
                    log.info("%s %s seed=%d lr=%g steps=%d val %.4f test %.4f %.1fs", tname,
                             sname, seed, lr, s, v, t, sec)  # fmt: skip
                cells.append(cell)
    meta = {"command": command, "machine": _machine(device), "n": n, "seeds": args.seeds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "polish_budget.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    text = render(cells, meta, sorted(checkpoints), args.lrs)
    (out / "polish_budget.md").write_text(text)
    print(text)
    return 0


def render(cells: list[dict], meta: dict, checkpoints: list[int], lrs: list[float]) -> str:
    lines = [
        "# Polish budget: closed form + k polish steps against MiR",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"N={meta['n']}, seeds {meta['seeds']}: accuracy on the 10,000 test images, mean ± std "
        "over seeds; the learning rate at each budget picked on the held-out slice (mean over "
        "seeds); time = kernel closed form + polish up to k steps (evaluation excluded), as a "
        "multiple of the closed form's and of MiR's time (MiR on the first seed, same process).",
        "",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["teacher"], c["student"]), []).append(c)
    for (tname, sname), cs in groups.items():
        mir = next(c["mir"] for c in cs if "mir" in c)
        kernel = statistics.mean(c["kernel_s"] for c in cs)
        lines += [
            f"## {tname} / {sname}: MiR {mir[0]:.2%} in {mir[1]:.1f} s "
            f"({mir[1] / kernel:.0f}× the closed form)",
            "",
            "| polish steps | lr (picked on held-out) | held-out | test | time / closed form "
            "| time / MiR |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for steps in [0, *checkpoints]:
            options = [0.0] if steps == 0 else lrs
            rows = {
                lr: [next(r for r in c["curve"] if r[0] == lr and r[1] == steps) for c in cs]
                for lr in options
            }
            lr = max(options, key=lambda k: statistics.mean(r[2] for r in rows[k]))
            picked = rows[lr]
            tests = [r[3] for r in picked]
            std = statistics.stdev(tests) if len(tests) > 1 else 0.0
            secs = statistics.mean(r[4] for r in picked)
            lines.append(
                f"| {steps} | {'–' if steps == 0 else f'{lr:g}'} | "
                f"{statistics.mean(r[2] for r in picked):.2%} | "
                f"{statistics.mean(tests):.2%} ± {std:.2%} | {secs / kernel:.1f}× | "
                f"{secs / mir[1]:.2f}× |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
