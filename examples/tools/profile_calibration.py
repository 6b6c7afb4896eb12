"""Where calibration's time goes: cProfile (Python side) and torch.profiler (operators) of one
CalibrateAdapters run, after a warm-up run, next to the forward floor.

    python -m examples.tools.profile_calibration                           # vgg-style, 32x32, N=256
    python -m examples.tools.profile_calibration --pair resnet18 \\
        --size 224 --samples 64 --mode kernel
    python -m examples.tools.profile_calibration --device cuda --samples 512

The pairs are examples/benchmarks/bench_calibration.py's (student L1-pruned 50%).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import time

import torch

import fxkd
from examples.benchmarks.bench_calibration import PAIRS, _sync, make_pair
from fxkd.align import align
from fxkd.capture import trace
from fxkd.passes import CalibrateAdapters, InsertAdapters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pair", choices=PAIRS, default="vgg-style")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--mode", choices=fxkd.config.MODES, default="pointwise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    device = torch.device(args.device)
    teacher, student, shape = make_pair(args.pair, args.size)
    teacher, student = teacher.to(device), student.to(device)
    x = torch.randn(args.samples, *shape, device=device)
    cfg = fxkd.CompressConfig(mode=args.mode, num_samples=args.samples, progress=False)
    t_gm = trace(teacher, x[:2])

    def prepared():
        gm = trace(copy.deepcopy(student), x[:2])
        InsertAdapters(align(t_gm, gm, channel_maps=student.fxkd_channel_maps), args.mode)(gm)
        return gm

    def calibrate(gm):
        _sync(device)
        start = time.perf_counter()
        CalibrateAdapters(t_gm, x, cfg)(gm)
        _sync(device)
        return time.perf_counter() - start

    def floor():
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for c in x.split(cfg.chunk_size):
                teacher(c)
                student(c)
        _sync(device)
        return time.perf_counter() - start

    floor(), calibrate(prepared())  # warm-up
    f, c = min(floor() for _ in range(3)), min(calibrate(prepared()) for _ in range(3))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.pair} {args.size}x{args.size} N={args.samples} {args.mode} on {name}: "
          f"floor {f:.3f} s, calibration {c:.3f} s ({c / f:.2f}x)")  # fmt: skip
    gm = prepared()
    prof = cProfile.Profile()
    prof.enable()
    calibrate(gm)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    gm = prepared()
    with torch.profiler.profile(activities=activities) as tp:
        calibrate(gm)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(tp.key_averages().table(sort_by=key, row_limit=args.top))


if __name__ == "__main__":
    main()
