"""Where each method leaves its error: relative error to the teacher at every aligned point.

    python -m examples.benchmarks.error_profile  # VGG + ResNet, L1 50/75 %, N=100
    python -m examples.benchmarks.error_profile --teachers vgg --students l1-50

Why does MiR (trained end to end on the features before pooling) beat the closed form on some
students although the closed form fits every block? This script measures it: for the benchmark's
students and samples (the
benchmark's fashion_mnist.py, one seed), it recovers the student with fxkd's
kernel closed form, the closed form + polish, FitNet and MiR, then reports on held-out training
images (never the test set) ||s − t|| / ||t|| at every aligned point (t restricted to the kept
channels) and at the features before global pooling, next to test accuracy.
Writes examples/benchmarks/results/error_profile.md and error_profile.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from examples.benchmarks.fashion_mnist import (
    RESULTS,
    _machine,
    load_splits,
    make_students,
    prepool_node,
    run_method,
    sample_indices,
    tapped,
)
from fxkd.align import align
from fxkd.capture import trace
from fxkd.cli.demo import load_teacher
from fxkd.students import channel_maps_of

log = logging.getLogger("error_profile")
METHODS = ["none", "fxkd-kernel", "fxkd-polish", "fitnet", "mir"]


def points_of(teacher, student, example):
    """[(label, student node, teacher node, kept teacher channels or None, channel dim)]:
    every aligned point, then the features before global pooling."""
    t_gm, s_gm = trace(teacher, example), trace(student, example)
    pairs = align(t_gm, s_gm, channel_maps=channel_maps_of(student)).pairs
    points = {}  # one row per student point (two adapters can meet at one residual add)
    for p in pairs:
        points.setdefault(
            p.site.point,
            (p.site.point, p.site.point, p.teacher_point, p.channel_map, p.site.channel_dim),
        )
    s_pre, t_pre = prepool_node(s_gm), prepool_node(t_gm)
    if s_pre not in points:  # the students keep the last conv's channels: no map
        points[s_pre] = ("pre-pool", s_pre, t_pre, None, 1)
    order = {n.name: i for i, n in enumerate(s_gm.graph.nodes)}
    return sorted(points.values(), key=lambda q: order[q[1]])


@torch.no_grad()
def errors(model, teacher, points, x, example) -> list[float]:
    s_vals, _ = tapped(model, [p[1] for p in points], example)(x)
    t_vals, _ = tapped(teacher, [p[2] for p in points], example)(x)
    out = []
    for (_, _, _, cmap, dim), s, t in zip(points, s_vals, t_vals, strict=True):
        if cmap is not None:
            t = t.index_select(dim, torch.tensor(list(cmap)))
        out.append(float((s - t).norm() / t.norm()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=["vgg", "resnet"])
    p.add_argument("--students", nargs="+", default=["l1-50", "l1-75"])
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", type=int, default=1000, help="held-out images for the errors")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fxkd").setLevel(logging.WARNING)
    command = "python -m examples.benchmarks.error_profile " + " ".join(argv or sys.argv[1:])
    data = load_splits(args.data_dir)
    pool, pool_y, val = data.pool_x, data.pool_y, data.val
    xte, yte = data.test
    held = data.rest[: args.held_out]  # held out, not the selection slice either
    n = args.samples
    idx = sample_indices(len(pool), n, args.seed)  # the benchmark's samples
    x, y = pool[idx], pool_y[idx]
    panels = []
    for tname in args.teachers:
        teacher = load_teacher(tname)
        students = make_students(teacher, x[:1], (0.5, 0.75))
        for sname in args.students:
            student = students[sname]
            points = points_of(teacher, student, x[:2])
            table = {}
            for method in METHODS:
                res = run_method(method, teacher, student, x, y, val, (xte, yte), args.seed, {})
                table[method] = (res["acc"], errors(res["model"], teacher, points, held, x[:2]))
                log.info("%s %s %-11s acc %.4f  %.1fs", tname, sname, method, res["acc"],
                         res["seconds"])  # fmt: skip
            panels.append((f"{tname} / {sname}", [p[0] for p in points], table))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error_profile.json").write_text(json.dumps(panels, indent=1) + "\n")
    text = render(panels, command, n, args)
    (out / "error_profile.md").write_text(text)
    plot(out / "error_profile.png", panels)
    print(text)
    return 0


def render(panels, command, n, args) -> str:
    lines = [
        "# Error profile: where each method leaves its error",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}  ",
        f"N={n} unlabelled samples (seed {args.seed}, the benchmark's); errors ||s − t|| / ||t|| "
        f"on {args.held_out} held-out training images; accuracy on the 10,000 test images.",
        "",
    ]
    for title, labels, table in panels:
        lines += [f"## {title}", "", "| point | " + " | ".join(METHODS) + " |"]
        lines.append("| --- |" + " --- |" * len(METHODS))
        for k, label in enumerate(labels):
            lines.append(
                f"| {label} | " + " | ".join(f"{table[m][1][k]:.3f}" for m in METHODS) + " |"
            )
        lines.append(
            "| **test accuracy** | " + " | ".join(f"{table[m][0]:.2%}" for m in METHODS) + " |"
        )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(path: Path, panels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, labels, table) in zip(axes[0], panels, strict=True):
        for method in METHODS:
            acc, errs = table[method]
            ax.plot(range(len(labels)), errs, marker="o", label=f"{method} ({acc:.1%})")
        ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=6)
        ax.set_ylabel("relative error to the teacher")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
