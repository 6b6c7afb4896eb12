"""Calibration cost, measured side by side in one run: fxkd's one-pass lockstep calibration
against the floor (one no-grad forward of teacher and student over the same chunks) and against
the reference FSKD schedule (re-run both networks up to each block, solve, repeat).

    # small VGG/ResNet pairs, 32x32, N=64, 256, 1024
    python -m examples.benchmarks.bench_calibration
    python -m examples.benchmarks.bench_calibration --pairs resnet18 \\
        --size 224 --samples 64 --repeats 1
    python -m examples.benchmarks.bench_calibration --pairs resnet50 --size 224 --samples 512 \\
        --device cuda --offload  # what examples/tools/gpu_check.sh runs

Per pair, mode and N it runs --warmup untimed floor and fxkd runs (first calls pay one-time
costs: resnet-style N=64 pointwise, one round, 2.62 cold against 2.24 warm), then --repeats
rounds of floor, fxkd and per-block back to back (--no-per-block: floor and fxkd) and prints
the medians of the ratios taken within each round (fxkd/floor, per-block/fxkd: both sides of a
ratio see the same state of a noisy shared machine), the median times, compress end to end;
then, from one more run of each: peak memory (CUDA: the allocator's peak above the start; CPU:
resident memory sampled every millisecond above the start, freed memory trimmed before each
run), fxkd's memory estimate of the held activations next to what its runners actually held,
and the Gram's GEMM rate (FLOPs of the normal-equation updates over their own time) against
this machine's fp32 matmul rate. Ratios, not absolute times, are the claim. Torchvision pairs
are random-init (random BatchNorm statistics) with every block's internal convs L1-pruned by
half (block outputs kept: "internally pruned").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import statistics
import threading
import time

import torch

import fxkd
from fxkd.align import align
from fxkd.capture import trace
from fxkd.cli.zoo import FashionResNet, FashionVGG
from fxkd.passes import CalibrateAdapters, InsertAdapters
from fxkd.passes.calibrate import adapter_groups, projected_sources
from fxkd.passes.runner import GraphRunner
from fxkd.placement import full_precision
from fxkd.solve.normal import NormalEquations
from fxkd.students import prune
from tests.models import randomize_bn

PAIRS = ("vgg-style", "resnet-style", "resnet18", "resnet50")


class PerBlockCalibration(CalibrateAdapters):
    """The reference FSKD schedule: for every block, run the teacher and the student from the
    input up to that block, solve it, and start over for the next one. Same problems, same
    solver (it reuses CalibrateAdapters' solve), B times the forward work."""

    def call(self, graph_module):
        gm = graph_module
        groups = adapter_groups(gm)
        device = next(gm.parameters()).device
        t_view = self._teacher_view(groups)  # as fxkd runs it: the schedules differ, nothing else
        t_nodes = {n.name: n for n in t_view.graph.nodes}
        chunks = list(self.samples.split(self.config.chunk_size))
        pending = {m.node for ms in groups.values() for m in ms}
        with torch.no_grad(), full_precision():
            for point, members in groups.items():
                target = t_nodes[members[0].module.pair.teacher_point]
                teacher = GraphRunner(t_view, chunks, pinned=[target])
                self._sources = projected_sources([members])
                student = GraphRunner(gm, chunks, pinned=self._sources)
                self._solve(
                    point, members, target, teacher, student, None, pending, device, torch.float32
                )
        return torch.fx.passes.infra.pass_base.PassResult(gm, True)


def make_pair(name: str, size: int):
    """(teacher, student, input shape) for a pair name, student L1-pruned 50%."""
    torch.manual_seed(0)
    if name in ("vgg-style", "resnet-style"):
        teacher = (FashionVGG() if name == "vgg-style" else FashionResNet()).eval()
        student = prune(teacher, 0.5, example_inputs=torch.randn(1, 1, size, size))
        return teacher, student, (1, size, size)
    import torchvision

    teacher = randomize_bn(getattr(torchvision.models, name)(weights=None))
    # internal pruning: every block output (last conv of a block, downsample, stem) and the
    # classifier keep their width, the convs inside the blocks lose half their filters
    keep = [teacher.conv1, teacher.fc]
    for layer in (teacher.layer1, teacher.layer2, teacher.layer3, teacher.layer4):
        for block in layer:
            convs = [m for n, m in block.named_children() if n.startswith("conv")]
            keep.append(convs[-1])
            if block.downsample is not None:
                keep.append(block.downsample[0])
    student = prune(teacher, 0.5, example_inputs=torch.randn(1, 3, size, size), ignored_layers=keep)
    return teacher, student, (3, size, size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``repeats`` calls (the device synchronised around each)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_memory(fn, device: torch.device) -> int:
    """Bytes above the start at the peak of one call: the CUDA allocator's peak, or the
    process's resident memory sampled every millisecond (freed memory trimmed first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss()) - base


def matmul_rate(device: torch.device) -> float:
    """This machine's fp32 matmul rate (GFLOP/s, TF32 off), a square product's best of 5."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    with full_precision():
        for _ in range(5):
            best = min(best, timed(lambda: a @ b, 1, device))
    return 2 * n**3 / best / 1e9


class GramMeter:
    """Counts the FLOPs of NormalEquations' updates (update_blocks and update_patches: the
    Gram and cross GEMMs) and times them, patch building and shifts included (device
    synced)."""

    METHODS = ("update_blocks", "update_patches")

    def __init__(self, device: torch.device) -> None:
        self.device, self.flops, self.seconds = device, 0, 0.0

    def __enter__(self):
        self.originals = {name: getattr(NormalEquations, name) for name in self.METHODS}
        for name, original in self.originals.items():
            setattr(NormalEquations, name, self._metered(original))
        return self

    def _metered(self, original):
        meter = self

        def update(eqs, *args):
            y = args[-1]  # (B, P, K, L)
            b, p, k, length = y.shape
            meter.flops += 2 * p * eqs.features * (eqs.features + k) * b * length
            _sync(meter.device)
            start = time.perf_counter()
            original(eqs, *args)
            _sync(meter.device)
            meter.seconds += time.perf_counter() - start

        return update

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(NormalEquations, name, original)


def measure(teacher, student, samples, mode, args, device) -> dict:
    """Seconds (medians), peak bytes and Gram rate of floor, fxkd, per-block and compress."""
    chunks = samples.split(args.chunk_size)
    repeats = args.repeats

    def floor():
        with torch.no_grad():
            for c in chunks:
                teacher(c)
                student(c)

    cfg = fxkd.CompressConfig(
        mode=mode, num_samples=len(samples), chunk_size=args.chunk_size, progress=False
    )
    t_gm = trace(teacher, samples[:2])

    def prepared():
        gm = trace(copy.deepcopy(student), samples[:2])
        InsertAdapters(align(t_gm, gm, channel_maps=student.fxkd_channel_maps), mode)(gm)
        return gm

    def run(cls, config=cfg):
        gm = prepared()
        return lambda: cls(t_gm, samples, config)(gm)

    # rounds of floor, fxkd, per-block back to back: the ratios are taken within a round (the
    # same machine state on a noisy shared host), then the median over rounds
    for _ in range(args.warmup):  # untimed: first calls pay one-time costs (oneDNN primitives)
        floor()
        run(CalibrateAdapters)()
    rounds = []
    for _ in range(repeats):
        t = {"floor": timed(floor, 1, device)}
        t["fxkd"] = timed(run(CalibrateAdapters), 1, device)
        if args.per_block:
            t["per-block"] = timed(run(PerBlockCalibration), 1, device)
        rounds.append(t)
    out = {k: statistics.median(t[k] for t in rounds) for k in rounds[0]}
    out["fxkd/floor"] = statistics.median(t["fxkd"] / t["floor"] for t in rounds)
    if args.per_block:
        out["per-block/fxkd"] = statistics.median(t["per-block"] / t["fxkd"] for t in rounds)
    out["compress"] = timed(
        lambda: fxkd.compress(teacher, student, samples, config=cfg), repeats, device
    )
    out["blocks"] = len(adapter_groups(prepared()))
    if args.offload:
        out["fxkd-offload"] = timed(run(CalibrateAdapters, cfg.replace(offload=True)), 1, device)
    if args.memory:
        peaks = {"floor": peak_memory(floor, device)}
        cal = CalibrateAdapters(t_gm, samples, cfg)
        gm = prepared()
        peaks["fxkd"] = peak_memory(lambda: cal(gm), device)
        if args.per_block:
            peaks["per-block"] = peak_memory(run(PerBlockCalibration), device)
        if args.offload:
            peaks["fxkd-offload"] = peak_memory(
                run(CalibrateAdapters, cfg.replace(offload=True)), device
            )
        out["peak"] = peaks
        out["estimated-held"] = sum(cal.memory.held.values())
        out["measured-held"] = sum(cal.peak_held.values())
    with GramMeter(device) as meter:
        run(CalibrateAdapters)()
    out["gram-gflops"] = meter.flops / 1e9
    out["gram-s"] = meter.seconds
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", nargs="+", choices=PAIRS, default=["vgg-style", "resnet-style"])
    p.add_argument("--samples", nargs="+", type=int, default=[64, 256, 1024])
    p.add_argument("--modes", nargs="+", choices=fxkd.config.MODES, default=list(fxkd.config.MODES))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed floor + fxkd runs first")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--offload", action="store_true", help="also time fxkd with offload=True")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak memory")
    p.add_argument(
        "--no-per-block",
        dest="per_block",
        action="store_false",
        help="skip the per-block schedule (more rounds of fxkd/floor in the same time)",
    )
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = matmul_rate(device)
    print(
        f"torch {torch.__version__} on {name}, {torch.get_num_threads()} CPU threads, input "
        f"{args.size}x{args.size}, chunk {args.chunk_size}; medians of {args.repeats} rounds "
        f"after {args.warmup} untimed; "
        f"fp32 matmul (TF32 off) {peak:.0f} GFLOP/s"
    )
    print(
        f"{'pair':<13} {'mode':<9} {'N':>5} {'blocks':>6} {'floor s':>8} {'fxkd s':>7} "
        f"{'per-block s':>11} {'fxkd/floor':>10} {'per-block/fxkd':>14} {'compress s':>10} "
        f"{'peak MiB floor/fxkd/per-block':>29} {'held MiB est/meas':>17} {'Gram GFLOP/s':>12}"
    )
    rows = []
    for pair in args.pairs:
        teacher, student, shape = make_pair(pair, args.size)
        teacher, student = teacher.to(device), student.to(device)
        for n in args.samples:
            samples = torch.randn(n, *shape, generator=torch.Generator().manual_seed(n)).to(device)
            for mode in args.modes:
                r = measure(teacher, student, samples, mode, args, device)
                floor, fx = r["floor"], r["fxkd"]
                block = f"{r['per-block']:.3f}" if "per-block" in r else "-"
                ratio = f"{r['per-block/fxkd']:.2f}" if "per-block" in r else "-"
                peaks = held = "-"
                if "peak" in r:
                    peaks = "/".join(
                        _mib(r["peak"][k]) if k in r["peak"] else "-"
                        for k in ("floor", "fxkd", "per-block")
                    )
                    held = f"{_mib(r['estimated-held'])}/{_mib(r['measured-held'])}"
                rate = r["gram-gflops"] / max(r["gram-s"], 1e-9)
                print(
                    f"{pair:<13} {mode:<9} {n:>5} {r['blocks']:>6} {floor:>8.3f} {fx:>7.3f} "
                    f"{block:>11} {r['fxkd/floor']:>10.2f} {ratio:>14} "
                    f"{r['compress']:>10.3f} {peaks:>29} {held:>17} {rate:>12.0f}",
                    flush=True,
                )
                if "fxkd-offload" in r:
                    extra = f", peak {_mib(r['peak']['fxkd-offload'])} MiB" if "peak" in r else ""
                    print(
                        f"{'':<13} offload: {r['fxkd-offload']:.3f} s "
                        f"({r['fxkd-offload'] / fx:.2f}x fxkd){extra}"
                    )
                rows.append({"pair": pair, "mode": mode, "N": n, "device": name, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
