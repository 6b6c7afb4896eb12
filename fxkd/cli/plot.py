"""The demo's picture: accuracies, and every aligned point's error before and after calibration."""

from __future__ import annotations

from pathlib import Path

from fxkd.report import Report

__all__ = ["SIZE", "plot_demo"]

SIZE = (1200, 450)
"""The PNG's width and height in pixels."""


def plot_demo(
    path: Path, accuracies: dict[str, float], reports: dict[str, Report], title: str
) -> Path:
    """Write a PNG of two panels: test accuracy of each model (bars) and, for each mode, the
    relative error at every aligned point for the student as given and after calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(SIZE[0] / dpi, SIZE[1] / dpi), dpi=dpi, width_ratios=(1, 2)
    )
    names, values = list(accuracies), [100 * v for v in accuracies.values()]
    bars = left.bar(range(len(names)), values, color=["#555555", "#c44e52"] + ["#4c72b0"] * 9)
    left.bar_label(bars, fmt="%.1f%%", fontsize=8)
    left.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title("accuracy")
    for i, (mode, report) in enumerate(reports.items()):
        rows = report.calibrated
        x = range(len(rows))
        if i == 0:
            given = [r.err_given if r.err_given is not None else float("nan") for r in rows]
            right.plot(x, given, "o-", color="#c44e52", label="student as given")
        right.plot(x, [r.err_after for r in rows], "o-", label=f"after calibration ({mode})")
        right.set_xticks(list(x), [r.student for r in rows], rotation=30, ha="right", fontsize=7)
    right.set_yscale("symlog", linthresh=1e-3)
    right.set_ylim(bottom=0)
    right.set_ylabel("relative error at the point")
    right.set_title("error at each aligned point")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
