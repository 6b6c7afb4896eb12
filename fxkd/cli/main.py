"""The ``fxkd`` command.

fxkd demo                      recover a pruned Fashion-MNIST VGG from 100 unlabelled images
fxkd compress --teacher T --student S --data D --samples N --onnx out.onnx
fxkd validate out.onnx --reference student.pt --data D
"""

from __future__ import annotations

import argparse
import logging
import sys

from fxkd.errors import FxkdError

__all__ = ["main"]

EXAMPLES = {
    "demo": "example: fxkd demo --ratio 0.5 --samples 100 --onnx student.onnx",
    "compress": "example: fxkd compress --teacher teacher.pt --student student.pt "
    "--data fashion-mnist --samples 256 --onnx student.onnx --out recovered/",
    "validate": "example: fxkd validate student.onnx --reference recovered/student.pt "
    "--data samples.npy",
}


def _compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from fxkd.api import compress
    from fxkd.cli.loading import load_data, load_model

    teacher = load_model(args.teacher, args.teacher_weights)
    student = load_model(args.student, args.student_weights)
    data = load_data(args.data, data_dir=args.data_dir, image_size=args.image_size)
    result = compress(
        teacher,
        student,
        data,
        num_samples=args.samples,
        mode=args.mode,
        onnx=args.onnx,
        seed=args.seed,
    )
    print(result.report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), out / "student_state_dict.pt")
    torch.save(result.model, out / "student.pt")
    print(f"wrote {out / 'student.pt'} (module) and {out / 'student_state_dict.pt'}")
    if result.onnx is not None:
        print(result.onnx)
        return 0 if result.onnx.passed else 1
    return 0


def _validate(args: argparse.Namespace) -> int:
    from fxkd.cli.loading import load_data, load_model
    from fxkd.data import take_samples
    from fxkd.onnx import validate_onnx

    model = load_model(args.reference, args.reference_weights)
    data = load_data(args.data, data_dir=args.data_dir, image_size=args.image_size)
    inputs = take_samples(data, args.samples)
    report = validate_onnx(args.model, model, inputs, atol=args.atol, rtol=args.rtol)
    print(report)
    for run, worst in report.per_provider.items():
        print(f"  {run}: max abs {worst:.3g}")
    return 0 if report.passed else 1


def _demo(args: argparse.Namespace) -> int:
    from fxkd.cli.demo import run_demo

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

    comp = sub.add_parser(
        "compress",
        help="recover a student from a few unlabelled samples",
        epilog=EXAMPLES["compress"],
    )
    comp.add_argument("--teacher", required=True, help="torch.save'd module or pkg.mod:factory")
    comp.add_argument("--student", required=True, help="torch.save'd module or pkg.mod:factory")
    comp.add_argument("--teacher-weights", default=None, help="state dict for a factory teacher")
    comp.add_argument("--student-weights", default=None, help="state dict for a factory student")
    comp.add_argument("--out", default="fxkd-out", help="folder for the recovered student")
    comp.add_argument("--mode", choices=["kernel", "pointwise"], default="kernel")
    comp.add_argument("--onnx", default=None, help="export and validate the result here")
    comp.add_argument("--seed", type=int, default=0)
    _data_args(comp, default_samples=256)
    comp.set_defaults(run=_compress)

    val = sub.add_parser(
        "validate",
        help="compare an ONNX file with its PyTorch reference",
        epilog=EXAMPLES["validate"],
    )
    val.add_argument("model", help="the .onnx file")
    val.add_argument("--reference", required=True, help="torch.save'd module or pkg.mod:factory")
    val.add_argument("--reference-weights", default=None)
    val.add_argument("--atol", type=float, default=1e-4)
    val.add_argument("--rtol", type=float, default=1e-3)
    _data_args(val, default_samples=64)
    val.set_defaults(run=_validate)
    return parser


def _data_args(p: argparse.ArgumentParser, default_samples: int) -> None:
    p.add_argument(
        "--data", required=True, help="fashion-mnist, a .pt/.npy tensor file, or an image folder"
    )
    p.add_argument("--samples", type=int, default=default_samples, help="samples to use (N)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (optional)")
    p.add_argument("--image-size", type=int, default=None, help="resize images (image folders)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (FxkdError, FileNotFoundError, OSError) as exc:
        print(f"fxkd: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
