"""Kernel-mode normal equations of one conv: im2col + GEMM against displaced products, side by
side in one process (fxkd.solve.displaced; the thresholds in it come from this benchmark).

    python -m examples.benchmarks.bench_displaced  # resnet18-like 3x3 convs, N = 64, CPU
    python -m examples.benchmarks.bench_displaced --device cuda --samples 512

For each conv shape, both routes accumulate the same fp32 normal equations (patches of a
ReLU input, sample slices as calibration's CPU sweep takes them, the whole chunk on a GPU) and
are read once; times are best of ``--repeats``, alternating which route goes first. Printed:
both times, their ratio, the displaced products' FLOP share, whether ``displaced_products_pay``
takes them by default, and each route's Gram error relative to the same sums taken in fp64
(the im2col route on fp64 copies: which route sums more accurately on this device).
"""

from __future__ import annotations

import argparse
import time

import torch

from fxkd.placement import full_precision
from fxkd.solve import displaced
from fxkd.solve import normal as lstsq
from fxkd.solve.normal import NormalEquations

SHAPES = [  # (C_in, C_out, H=W): resnet18 with its blocks' internal convs pruned by half
    (64, 32, 56), (32, 64, 56), (128, 64, 28), (64, 128, 28), (256, 128, 14), (128, 256, 14),
    (512, 256, 7), (256, 512, 7),
    # the 32x32 pairs' sizes
    (16, 16, 32), (32, 32, 32), (32, 32, 16), (64, 64, 8),
]  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accumulate(conv, x, y, device, route: bool) -> tuple[float, torch.Tensor]:
    """Seconds for one route over the samples, and the Gram."""
    n, c_out = x.shape[0], conv.out_channels
    per = n
    if device.type == "cpu":  # the calibration sweep's sample slices (<= 2 MiB of targets)
        per = max(1, (1 << 21) // (c_out * y.shape[-1] * 4))
    lstsq.displaced_products_pay = lambda m, v: route and displaced.displaced_products_fit(m, v)
    eqs = NormalEquations(1, conv.in_channels * 9, c_out, bias=True, device=device)
    _sync(device)
    start = time.perf_counter()
    for s in range(0, n, per):
        eqs.update_patches(x[s : s + per], conv, y[s : s + per])
    gram = eqs.gram
    _sync(device)
    return time.perf_counter() - start, gram


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    pay = lstsq.displaced_products_pay
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}, {torch.get_num_threads()} CPU threads, "
          f"N = {args.samples}, fp32, best of {args.repeats}")  # fmt: skip
    print(f"{'C_in':>5} {'C_out':>5} {'H=W':>4} {'im2col ms':>10} {'displaced ms':>13} "
          f"{'ratio':>6} {'FLOP share':>10} {'default':>8} "
          f"{'err im2col':>10} {'err displ.':>10}")  # fmt: skip
    torch.manual_seed(0)
    with full_precision():
        for c_in, c_out, size in SHAPES:
            conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(device)
            x = torch.randn(args.samples, c_in, size, size, device=device).relu()
            with torch.no_grad():
                y = conv(x).reshape(args.samples, 1, c_out, -1)
            best = {False: float("inf"), True: float("inf")}
            grams = {}
            for r in range(args.repeats):
                for route in (False, True) if r % 2 == 0 else (True, False):
                    seconds, grams[route] = accumulate(conv, x, y, device, route)
                    best[route] = min(best[route], seconds)
            _, exact = accumulate(conv, x.double(), y.double(), device, False)
            lstsq.displaced_products_pay = pay
            err = {r: float((g - exact).norm() / exact.norm()) for r, g in grams.items()}
            share = displaced.Geometry(conv, (size, size)).cost_share()
            default = pay(conv, x[:1])
            print(f"{c_in:>5} {c_out:>5} {size:>4} {best[False] * 1e3:>10.1f} "
                  f"{best[True] * 1e3:>13.1f} {best[True] / best[False]:>6.2f} {share:>10.2f} "
                  f"{default!s:>8} {err[False]:>10.1e} {err[True]:>10.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
