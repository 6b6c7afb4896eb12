"""prune over a model zoo: time, memory, parameters kept, and whether compress then passes.

    python -m examples.benchmarks.prune_zoo                  # every model (about 20 min)
    python -m examples.benchmarks.prune_zoo --models rexnet_100 swin_t --readme

For each model (timm families from tests/zoo_cases.py's TIMM_MODELS and a few torchvision ones;
random init, non-trivial BatchNorm statistics, 64×64 inputs) it runs ``fxkd.students.prune(model,
0.5)`` with the default budgets (time 120 s, memory half of what is available), sampling the
process's resident memory every 10 ms for the peak growth, then
``fxkd.support.check_support`` on 32 samples (kernel mode; ONNX validated). Which analysis built
the student is read from prune's warning (torch-pruning, or fxkd's own after torch-pruning
failed or ran past a budget). Writes examples/benchmarks/results/prune_zoo.md; with --readme
also the table between the prune-zoo markers of docs/supported.md.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
import warnings
from pathlib import Path

import torch
import torchvision

from fxkd.errors import FxkdError
from fxkd.students import prune
from fxkd.students.budget import resident_bytes
from fxkd.support import check_support
from tests.models import randomize_bn
from tests.zoo_cases import TIMM_MODELS, timm_model

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- prune-zoo:start -->", "<!-- prune-zoo:end -->"
TORCHVISION = ["resnet50", "regnet_x_400mf", "shufflenet_v2_x0_5", "swin_t"]


def build(name: str) -> torch.nn.Module:
    if name in TIMM_MODELS:
        return timm_model(name)
    torch.manual_seed(0)
    return randomize_bn(getattr(torchvision.models, name)(num_classes=10)).eval()


class PeakMemory:
    """The largest growth of the resident memory over the block, sampled every 10 ms."""

    def __enter__(self):
        self.base, self.peak, self._stop = resident_bytes(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, resident_bytes() - self.base)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes() - self.base)


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def row(name: str) -> tuple[str, str]:
    """(table row, detail line) for one model."""
    model = build(name)
    x = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    caught = Warnings()
    logging.getLogger("fxkd.students.pruning").addHandler(caught)
    start = time.perf_counter()
    try:
        with PeakMemory() as memory:
            student = prune(model, 0.5, example_inputs=x[:2])
    except FxkdError as exc:
        first = str(exc).splitlines()[0]
        seconds = time.perf_counter() - start
        return (
            f"| {name} | refused | {seconds:.1f} | - | - | - | - |",
            f"{name}: refused after {seconds:.1f}s: {type(exc).__name__}: {first}",
        )
    finally:
        logging.getLogger("fxkd.students.pruning").removeHandler(caught)
    seconds = time.perf_counter() - start
    fallback = next((m for m in caught.messages if "fxkd's own" in m), None)
    by = "fxkd" if fallback else "torch-pruning"
    kept = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in model.parameters())
    try:
        support = check_support(model, student, x)
        verdict = "✓" if support.ok else "✗"
        stages = f"{len(support.stages_aligned)}/{len(support.stages)}"
        checked = (
            f"{verdict} {support.pairs} pairs, stages {stages}, worse {len(support.worse)}, "
            f"ONNX {'ok' if support.onnx_passed and support.onnx_same_size else 'FAIL'}"
        )
        front = support.capture
    except Exception as exc:  # a crash is a result too
        checked, front = f"ERROR {type(exc).__name__}: {str(exc)[:80]}", "-"
    table = (
        f"| {name} | {by} | {seconds:.1f} | {memory.peak / 2**20:.0f} | {kept:.0%} | {front} "
        f"| {checked} |"
    )
    why = fallback.split(";")[0] if fallback else "torch-pruning's groups"
    return table, f"{name}: {by} ({why}), {seconds:.1f}s, {kept:.0%} kept; {checked}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[*TIMM_MODELS, *TORCHVISION])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/prune_zoo.md")
    parser.add_argument("--readme", action="store_true", help="update docs/supported.md too")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("fxkd").setLevel(logging.WARNING)
    logging.getLogger("fxkd.solve").setLevel(logging.ERROR)
    logging.getLogger("fxkd.passes").setLevel(logging.ERROR)

    lines = [
        "| model | pruned by | prune s | peak memory MiB | params kept | capture | compress |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    details = []
    for name in args.models:
        table, detail = row(name)
        print(detail, flush=True)
        lines.append(table)
        details.append(detail)
    body = "\n".join(lines) + (
        "\n\n`prune(model, 0.5)` with its default budgets (120 s, half the available memory), "
        "then `check_support` (32 samples, kernel mode, ONNX validated): pairs aligned, teacher "
        "stages (conv resolutions) with an aligned point, points worse after their solve. "
        "Random init, 64×64 inputs, a 2-core CPU shared with other work. Generated by "
        "`python -m examples.benchmarks.prune_zoo --readme`.\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# prune over a model zoo\n\n" + body + "\n## Details\n\n"
        + "\n".join(f"- {d}" for d in details) + "\n"
    )  # fmt: skip
    print(f"wrote {args.out}")
    if args.readme:
        page = ROOT / "docs/supported.md"
        text = page.read_text()
        if START in text:
            head, rest = text.split(START, 1)
            text = head + START + "\n" + body + END + rest.split(END, 1)[1]
        else:
            text = (
                text.rstrip()
                + "\n\n## prune over a model zoo\n\n"
                + START
                + "\n"
                + body
                + END
                + "\n"
            )
        page.write_text(text)
        print(f"updated {page}")


if __name__ == "__main__":
    main()
