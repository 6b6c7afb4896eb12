"""The ``fxkd`` command.

fxkd demo                      recover a pruned Fashion-MNIST VGG from 100 unlabelled images
fxkd demo --ratio 0.7 --samples 500 --onnx student.onnx
"""

from __future__ import annotations

import argparse
import logging
import sys

from fxkd.errors import FxkdError

__all__ = ["main"]

EXAMPLES = {
    "demo": "example: fxkd demo --ratio 0.5 --samples 100 --onnx student.onnx",
}


def _demo(args: argparse.Namespace) -> int:
    from fxkd.demo import run_demo

    modes = ("pointwise", "kernel") if args.mode == "both" else (args.mode,)
    r = run_demo(
        arch=args.arch,
        ratio=args.ratio,
        num_samples=args.samples,
        modes=modes,
        onnx=args.onnx,
        data_dir=args.data_dir,
        seed=args.seed,
    )
    print(r.compress_result.report)
    print()
    print(
        f"fxkd demo: Fashion-MNIST {args.arch}, every conv L1-pruned {args.ratio:.0%} "
        f"({r.teacher_params:,} -> {r.student_params:,} parameters), {r.num_samples} "
        f"unlabelled samples; accuracy on the {r.test_set}:"
    )
    print(f"  teacher                      {r.teacher_acc:7.2%}")
    print(f"  student as pruned            {r.pruned_acc:7.2%}")
    for mode, acc in r.recovered.items():
        print(f"  fxkd {mode:<10} recovered  {acc:7.2%}   ({r.seconds[mode]:.1f} s, labels unused)")
    recovered = sum(p.numel() for p in r.compress_result.model.parameters())
    print(f"  recovered student parameters {recovered:,} (adapters folded away)")
    if r.compress_result.onnx is not None:
        print(f"  {r.compress_result.onnx}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxkd",
        description="Few-sample knowledge distillation as torch.fx compiler passes.",
    )
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="recover a pruned Fashion-MNIST VGG (ships with fxkd)", epilog=EXAMPLES["demo"]
    )
    demo.add_argument("--arch", choices=["vgg", "resnet"], default="vgg")
    demo.add_argument("--ratio", type=float, default=0.5, help="fraction of filters pruned")
    demo.add_argument("--samples", type=int, default=100, help="unlabelled samples (N)")
    demo.add_argument("--mode", choices=["pointwise", "kernel", "both"], default="both")
    demo.add_argument("--onnx", default=None, help="export and validate the result here")
    demo.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (optional)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except FxkdError as exc:
        print(f"fxkd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
