"""What the torch.export front-end costs against symbolic tracing, measured side by side.

    python -m examples.benchmarks.capture_cost            # resnet18, 64x64, N=64
    python -m examples.benchmarks.capture_cost --size 224 --samples 32 --repeats 3

For one torchvision resnet18 teacher and its ``prune(0.5)`` student (random init, non-trivial
BatchNorm statistics), each round captures the teacher with both front-ends and runs
``compress`` end to end with ``capture="fx"`` and ``capture="export"``, back to back; it prints
the medians of the within-round ratios (export/fx) and checks that both paths give the same
recovered model (max |difference| of the outputs on held-out inputs). Ratios, not absolute
times, are the claim: this is a shared machine.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
import torchvision

import fxkd
from fxkd.capture import capture
from fxkd.students import prune
from tests.models import randomize_bn


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    teacher = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(args.samples, 3, args.size, args.size)
    student = prune(teacher, 0.5, example_inputs=x[:2])
    held = torch.randn(16, 3, args.size, args.size)

    rows: dict[str, list[float]] = {k: [] for k in ("capture fx", "capture export", "fx", "export")}
    models = {}
    for _ in range(args.repeats):
        for method in ("fx", "export"):
            rows[f"capture {method}"].append(
                _timed(lambda m=method: capture(teacher, x[:2], method=m))[1]
            )
        for method in ("fx", "export"):
            result, seconds = _timed(
                lambda m=method: fxkd.compress(
                    teacher, student, x, num_samples=args.samples, capture=m, progress=False
                )
            )
            rows[method].append(seconds)
            models[method] = result.model
    with torch.no_grad():
        diff = float((models["fx"](held) - models["export"](held)).abs().max())
    capture_ratio = statistics.median(
        e / f for e, f in zip(rows["capture export"], rows["capture fx"], strict=True)
    )
    compress_ratio = statistics.median(
        e / f for e, f in zip(rows["export"], rows["fx"], strict=True)
    )
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"resnet18 {args.size}x{args.size}, prune(0.5) student, N={args.samples}, "
          f"{args.repeats} rounds (medians)")  # fmt: skip
    print(f"capture one model: fx {med['capture fx']:.2f} s, export {med['capture export']:.2f} s"
          f" (export/fx {capture_ratio:.1f}x)")  # fmt: skip
    print(f"compress end to end: fx {med['fx']:.2f} s, export {med['export']:.2f} s "
          f"(export/fx {compress_ratio:.2f}x)")  # fmt: skip
    print(f"recovered models, max |fx - export| on held-out inputs: {diff:.3g}")


if __name__ == "__main__":
    main()
