"""The ``fxkd`` command.

fxkd demo                      prune the shipped VGG, recover it, export ONNX, draw a PNG
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
    "demo": "example: fxkd demo --ratio 0.5 --samples 100 --out results/",
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


def demo_requirements(onnx: bool) -> str | None:
    """The first missing package the demo needs, named with the extra that brings it."""
    import importlib.util

    needed = ["matplotlib"] + (["onnxruntime"] if onnx else [])
    for name in needed:
        if importlib.util.find_spec(name) is None:
            return f"the demo needs {name}: pip install 'fxkd[demo]'" + (
                "" if name == "matplotlib" else " (or pass --no-onnx)"
            )
    return None


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from fxkd.cli.datasets import find_fashion_mnist
    from fxkd.cli.demo import run_demo
    from fxkd.cli.plot import plot_demo
    from fxkd.errors import ConfigError

    missing = demo_requirements(onnx=not args.no_onnx)
    if missing:
        raise ConfigError(missing)
    if not 0.0 <= args.ratio < 1.0:
        raise ConfigError(f"--ratio {args.ratio} must be in [0, 1)")
    if not 0 < args.samples <= 1000:
        raise ConfigError(f"--samples {args.samples} must be in 1..1000 (the shipped pool)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device here. Hint: --device cpu")
    if args.no_onnx and args.onnx:
        raise ConfigError("--onnx and --no-onnx contradict each other; pass one of them")
    if args.data_dir and find_fashion_mnist(args.data_dir) != Path(args.data_dir):
        raise ConfigError(
            f"--data-dir {args.data_dir} does not hold the four Fashion-MNIST IDX files "
            "(t10k-images-idx3-ubyte[.gz], ...)"
        )
    if args.test_set == "full" and find_fashion_mnist(args.data_dir) is None:
        raise ConfigError(
            "--test-set full: no Fashion-MNIST IDX files found. Hint: --data-dir DIR, "
            "or --test-set shipped"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = None if args.no_onnx else Path(args.onnx) if args.onnx else out / "student.onnx"
    if onnx_path is not None:
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
    modes = ("pointwise", "kernel") if args.mode == "both" else (args.mode,)
    _show_progress()
    r = run_demo(
        arch=args.arch,
        ratio=args.ratio,
        num_samples=args.samples,
        modes=modes,
        onnx=onnx_path,
        data_dir=args.data_dir,
        test_set=args.test_set,
        seed=args.seed,
        device=args.device,
    )
    last = modes[-1]
    print(r.compress_result.report)
    print()
    print(f"fxkd demo: Fashion-MNIST {args.arch}, every conv L1-pruned {args.ratio:.0%}, "
          f"{r.num_samples} unlabelled samples; accuracy on the {r.test_set}:")  # fmt: skip
    recovered_params = sum(p.numel() for p in r.compress_result.model.parameters())
    rows = [
        ("teacher", r.teacher_acc, r.teacher_params, r.teacher_macs, ""),
        ("student as pruned", r.pruned_acc, r.student_params, r.student_macs, ""),
    ]
    for mode, acc in r.recovered.items():
        exported = " with the ONNX export and check" if mode == last and onnx_path else ""
        rows.append((f"fxkd {mode} recovered", acc, recovered_params, r.recovered_macs,
                     f"{r.seconds[mode]:.1f} s{exported}, labels unused"))  # fmt: skip
    print(f"  {'model':<26} {'accuracy':>8}  {'parameters':>10}  {'MACs/sample':>12}")
    for name, acc, params, macs, note in rows:
        tail = f"  ({note})" if note else ""
        print(f"  {name:<26} {acc:8.2%}  {params:>10,}  {macs:>12,}{tail}")
    written = []
    if onnx_path is not None:
        report = r.compress_result.onnx
        size, weights = onnx_path.stat().st_size, 4 * recovered_params
        print(f"  ONNX ({last}): {onnx_path.name} {size / 1024:,.0f} KiB (the student's fp32 "
              f"weights {weights / 1024:,.0f} KiB); {report}")  # fmt: skip
        written.append(onnx_path)
    else:
        print("  ONNX: skipped (--no-onnx): no export, no onnxruntime check")
    torch.save(r.compress_result.model.cpu(), out / "student.pt")
    written.append(out / "student.pt")
    accuracies = {"teacher": r.teacher_acc, "pruned": r.pruned_acc}
    accuracies.update({f"fxkd {m}": a for m, a in r.recovered.items()})
    reports = {m: res.report for m, res in r.results.items()}
    title = (f"fxkd demo: Fashion-MNIST {args.arch}, L1-pruned {args.ratio:.0%}, "
             f"{r.num_samples} unlabelled samples")  # fmt: skip
    logging.getLogger("fxkd.cli.demo").info("drawing %s", out / "fxkd-demo.png")
    written.append(plot_demo(out / "fxkd-demo.png", accuracies, reports, title))
    print("wrote:")
    for path in written:
        print(f"  {path}")
    if onnx_path is not None and not r.compress_result.onnx.passed:
        return 1
    return 0


def _show_progress() -> None:
    """The demo's steps (logged by fxkd.cli.demo) as lines on stderr, beside tqdm's bars."""
    log = logging.getLogger("fxkd.cli.demo")
    if log.getEffectiveLevel() > logging.INFO:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fxkd demo: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _device(value: str) -> str:
    """cpu, cuda or cuda:N (argparse type: anything else is a one-line usage error)."""
    head, _, index = value.partition(":")
    if value == "cpu" or (head == "cuda" and (not index or index.isdigit())):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: expected cpu, cuda or cuda:N")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): ``fxkd demo: error: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fxkd",
        description="Few-sample knowledge distillation as torch.fx compiler passes.",
    )
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="prune a shipped Fashion-MNIST teacher, recover it from 100 unlabelled images, "
        "export it to ONNX and check it, draw a picture",
        epilog=EXAMPLES["demo"],
    )
    demo.add_argument(
        "--out",
        default="fxkd-demo",
        help="folder the demo writes student.onnx, student.pt and fxkd-demo.png into "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="where pruning, recovery and evaluation run: cpu, cuda or cuda:N "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--arch",
        choices=["vgg", "resnet"],
        default="vgg",
        help="which shipped Fashion-MNIST teacher is pruned (default: %(default)s)",
    )
    demo.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help="share of every conv's filters removed by L1 pruning, in [0, 1) "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--samples",
        type=int,
        default=100,
        help="how many unlabelled images the student is recovered from, 1..1000 "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--mode",
        choices=["pointwise", "kernel", "both"],
        default="both",
        help="pointwise (the paper's 1x1 Q), kernel (the whole kernel, fxkd's default) or "
        "both, one after the other; the last one run is exported (default: %(default)s)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed that picks the unlabelled images from the shipped pool (default: %(default)s)",
    )
    demo.add_argument(
        "--data-dir",
        default=None,
        help="folder with the Fashion-MNIST IDX files, to measure accuracy on the full test set "
        "(else $FXKD_DATA or /usr/share/datasets/fashion-mnist is looked in)",
    )
    demo.add_argument(
        "--test-set",
        choices=["auto", "full", "shipped"],
        default="auto",
        help="accuracy on the full 10,000-image test set (full), on the shipped 2,000-image "
        "subset (shipped, faster), or the full one when found (auto)",
    )
    demo.add_argument(
        "--no-onnx",
        action="store_true",
        help="skip the ONNX export and the onnxruntime check (no onnxruntime needed)",
    )
    demo.add_argument(
        "--onnx",
        metavar="PATH",
        default=None,
        help="write the ONNX file here instead of OUT/student.onnx",
    )
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
