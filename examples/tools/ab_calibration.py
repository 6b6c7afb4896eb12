"""In-process A/B of the calibration pass: a git revision's ``CalibrateAdapters`` run (``call``,
``_solve``, ``_solve_jointly``) and ``NormalEquations`` against the working tree's, alternated
inside one process.

    python -m examples.tools.ab_calibration --rev HEAD~1 --pair resnet-style \\
        --samples 256 --mode kernel
    python -m examples.tools.ab_calibration --rev HEAD --pair resnet18 \\
        --size 224 --samples 64 --rounds 3
    python -m examples.tools.ab_calibration --rev .ab/old --device cuda --pair resnet18 --size 224

``--rev`` may name a directory holding the revision's files at their paths, for a machine
without the repository's history (a GPU machine gets the working tree only): make it with
``mkdir -p .ab/old && git archive <rev> fxkd passes | tar -x -C .ab/old`` and carry ``.ab``.

On a noisy shared machine separate processes (even alternated) misled us; alternating the two
variants inside one process, and which one goes first in each round, held up. Both variants run
the same teacher, student and samples; the per-point errors after the solve are compared, so a
speed-up that changes the results shows. Only ``passes/calibrate.py`` and the modules of the
normal equations (``REVISED``: the fxkd.solve modules) are taken from
the revision (the rest is the working tree's): use it for changes confined to them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

import fxkd
from examples.benchmarks.bench_calibration import PAIRS, _sync, make_pair
from fxkd.align import align
from fxkd.capture import trace
from fxkd.passes import CalibrateAdapters, InsertAdapters

ROOT = Path(__file__).resolve().parents[2]


def _source_at(rev: str, path: str) -> str | None:
    """The text of ``path`` as of ``rev``: a git revision, or a directory holding the
    revision's files (None when the file is not in it)."""
    if Path(rev).is_dir():
        file = Path(rev) / path
        return file.read_text() if file.is_file() else None
    shown = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True
    )
    return shown.stdout if shown.returncode == 0 else None


def _module_at(rev: str, path: str, name: str, package: str) -> dict | None:
    """The namespace of ``path`` as of ``rev``, imported as ``name`` (None when the file is
    not in that revision)."""
    source = _source_at(rev, path)
    if source is None:
        return None
    module = types.ModuleType(name)
    module.__package__ = package
    sys.modules[name] = module
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module.__dict__


REVISED = (
    "fxkd/solve/patches.py",
    "fxkd/solve/displaced.py",
    "fxkd/solve/narrow.py",
    "fxkd/solve/products.py",
    "fxkd/solve/ridge.py",
    "fxkd/solve/conditioning.py",
    "fxkd/solve/normal.py",
    "fxkd/solve/projection.py",
    "passes/calibrate.py",
)
"""The files taken from the revision, in import order: each sees the revision's earlier ones
(one the revision lacks is the working tree's)."""


def _revision(rev: str) -> dict:
    """The revision's calibrate namespace, its imports of the REVISED modules bound to the
    revision's copies (the working tree's sys.modules entries are put back afterwards)."""
    names = {path: "fxkd." + path[:-3].replace("/", ".").removeprefix("fxkd.") for path in REVISED}
    names["passes/calibrate.py"] = "fxkd.passes.calibrate"
    saved = {name: sys.modules.get(name) for name in names.values()}
    namespace = None
    try:
        for path, name in names.items():
            package = name.rsplit(".", 1)[0]
            namespace = _module_at(rev, path, f"{package}._ab_{name.rsplit('.', 1)[1]}", package)
            if namespace is not None:
                module = types.ModuleType(name)
                module.__dict__.update(namespace)
                sys.modules[name] = module
    finally:
        for name, module in saved.items():
            if module is not None:
                sys.modules[name] = module
            else:
                sys.modules.pop(name, None)
    return namespace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--rev", default="HEAD",
        help="git revision (or a directory of its files) to compare the working tree with",
    )  # fmt: skip
    p.add_argument("--pair", choices=PAIRS, default="resnet-style")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--mode", choices=fxkd.config.MODES, default="pointwise")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)

    calibrate = _revision(args.rev)

    def own_methods(cls) -> dict:  # the pass's whole run: every function the class defines
        return {name: fn for name, fn in vars(cls).items() if callable(fn)}

    variants = {
        args.rev: own_methods(calibrate["CalibrateAdapters"]),
        "working tree": own_methods(CalibrateAdapters),
    }

    teacher, student, shape = make_pair(args.pair, args.size)
    teacher, student = teacher.to(device), student.to(device)
    x = torch.randn(args.samples, *shape, device=device)
    cfg = fxkd.CompressConfig(mode=args.mode, num_samples=args.samples, progress=False)
    t_gm = trace(teacher, x[:2])

    def calibrate_once():
        gm = trace(copy.deepcopy(student), x[:2])
        InsertAdapters(align(t_gm, gm, channel_maps=student.fxkd_channel_maps), args.mode)(gm)
        cal = CalibrateAdapters(t_gm, x, cfg)
        _sync(device)
        start = time.perf_counter()
        cal(gm)
        _sync(device)
        return time.perf_counter() - start, cal.records

    times = {name: [] for name in variants}
    records = {}
    calibrate_once()  # warm-up
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            for method, fn in variants[name].items():
                setattr(CalibrateAdapters, method, fn)
            seconds, records[name] = calibrate_once()
            times[name].append(seconds)
    for method, fn in variants["working tree"].items():
        setattr(CalibrateAdapters, method, fn)
    old, new = (records[name] for name in variants)
    worst = max(
        abs(old[k].err_after - new[k].err_after) / max(old[k].err_after, old[k].err_before, 1e-6)
        for k in old
    )
    print(
        f"{args.pair} {args.size}x{args.size} N={args.samples} {args.mode}, {args.rounds} rounds"
        f" on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
    )
    for name, ts in times.items():
        each = " ".join(f"{t:.3f}" for t in ts)
        print(f"  {name:>14}: median {statistics.median(ts):.3f} s  ({each})")
    print(
        f"  largest change of a point's error after the solve (relative; errors below 1e-6, "
        f"fp32 rounding, count as 1e-6): {worst:.1e}"
    )


if __name__ == "__main__":
    main()
