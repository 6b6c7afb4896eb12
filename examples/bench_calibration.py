"""Calibration cost, measured side by side: fxkd's one-pass lockstep calibration against the
floor (one no-grad forward of teacher and student) and against the reference FSKD approach
(re-run both networks up to each block, solve, repeat).

    python examples/bench_calibration.py                      # small VGG/ResNet pairs, 32x32
    python examples/bench_calibration.py --samples 64 256 --repeats 3

Prints, per pair, mode and N: fxkd/floor and per-block/fxkd (medians of --repeats runs, all
in one process). Ratios, not absolute times, are the claim. Memory is not measured yet.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import fxkd
from fxkd.align import align
from fxkd.passes import CalibrateAdapters, InsertAdapters
from fxkd.passes.calibrate import _groups
from fxkd.passes.runner import GraphRunner
from fxkd.students import prune
from fxkd.trace import trace
from fxkd.zoo import FashionResNet, FashionVGG


class PerBlockCalibration(CalibrateAdapters):
    """The reference FSKD schedule: for every block, run the teacher and the student from the
    input up to that block, solve it, and start over for the next one. Same problems, same
    solver (it reuses CalibrateAdapters' solve), B times the forward work."""

    def call(self, graph_module):
        gm = graph_module
        groups = _groups(gm)
        device = next(gm.parameters()).device
        t_nodes = {n.name: n for n in self.teacher.graph.nodes}
        chunks = list(self.samples.split(self.config.chunk_size))
        pending = {m.node for ms in groups.values() for m in ms}
        with torch.no_grad():
            for point, members in groups.items():
                target = t_nodes[members[0].module.pair.teacher_point]
                teacher = GraphRunner(self.teacher, chunks, pinned=[target])
                student = GraphRunner(gm, chunks)
                self._solve(
                    point, members, target, teacher, student, None, pending, device, torch.float32
                )
        return torch.fx.passes.infra.pass_base.PassResult(gm, True)


def pairs(size: int):
    torch.manual_seed(0)
    example = torch.randn(1, 1, size, size)
    for name, teacher in (("vgg-style", FashionVGG()), ("resnet-style", FashionResNet())):
        teacher.eval()
        student = prune(teacher, 0.5, example_inputs=example)
        yield name, teacher, student, (1, size, size)


def timed(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(teacher, student, samples, mode: str, chunk_size: int, repeats: int) -> dict:
    """Seconds (medians) of the floor, fxkd's calibration pass, the per-block schedule and
    compress end to end, for one pair, mode and sample count."""
    chunks = samples.split(chunk_size)

    def floor():
        with torch.no_grad():
            for c in chunks:
                teacher(c)
                student(c)

    cfg = fxkd.CompressConfig(
        mode=mode, num_samples=len(samples), chunk_size=chunk_size, progress=False
    )
    t_gm = trace(teacher, samples[:2])

    def prepared():
        gm = trace(copy.deepcopy(student), samples[:2])
        InsertAdapters(align(t_gm, gm, channel_maps=student.fxkd_channel_maps), mode)(gm)
        return gm

    out = {"floor": timed(floor, repeats)}
    fresh = iter([prepared() for _ in range(repeats)])
    out["fxkd"] = timed(lambda: CalibrateAdapters(t_gm, samples, cfg)(next(fresh)), repeats)
    fresh = iter([prepared() for _ in range(repeats)])
    out["per-block"] = timed(lambda: PerBlockCalibration(t_gm, samples, cfg)(next(fresh)), repeats)
    out["compress"] = timed(lambda: fxkd.compress(teacher, student, samples, config=cfg), repeats)
    out["blocks"] = len(_groups(prepared()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", nargs="+", type=int, default=[64, 256])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=64)
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {args.size}x"
        f"{args.size}; medians of {args.repeats} runs"
    )
    print(
        f"{'pair':<13} {'mode':<9} {'N':>5} {'blocks':>6} {'floor s':>8} {'fxkd s':>7} "
        f"{'per-block s':>11} {'fxkd/floor':>10} {'per-block/fxkd':>14} {'compress s':>10}"
    )
    for name, teacher, student, shape in pairs(args.size):
        for n in args.samples:
            samples = torch.randn(n, *shape)
            for mode in ("pointwise", "kernel"):
                r = measure(teacher, student, samples, mode, args.chunk_size, args.repeats)
                floor, fx, block = r["floor"], r["fxkd"], r["per-block"]
                print(
                    f"{name:<13} {mode:<9} {n:>5} {r['blocks']:>6} {floor:>8.3f} {fx:>7.3f} "
                    f"{block:>11.3f} {fx / floor:>10.2f} {block / fx:>14.2f} "
                    f"{r['compress']:>10.3f}"
                )


if __name__ == "__main__":
    main()
