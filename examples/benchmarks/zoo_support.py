"""The model-zoo support table: torchvision and transformers architectures × student kinds,
checked end to end.

    python -m examples.benchmarks.zoo_support  # every case (about 20 min on 2 cores)
    python -m examples.benchmarks.zoo_support --archs resnet18 vit --kinds l1 decouple

For each case (tests/zoo_cases.py: random init, BatchNorms with non-trivial statistics, 64×64
inputs, 32 unlabelled samples, kernel mode) it runs fxkd.support.check_support — compress,
fold, export, onnxruntime validation — and writes examples/benchmarks/results/zoo_support.md; with
--readme it also replaces the table between the zoo-support markers of docs/supported.md.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

from fxkd.errors import FxkdError
from fxkd.support import check_support
from tests.zoo_cases import (  # shared with test_zoo
    ARCHS,
    DEPTH,
    HF_ARCHS,
    KINDS,
    NO_BATCHNORM,
    NO_CONV,
    make_case,
)

ROOT = Path(__file__).resolve().parents[2]

START, END = "<!-- zoo-support:start -->", "<!-- zoo-support:end -->"


def cell(arch: str, kind: str) -> tuple[str, str, str | None]:
    """(table cell, detail line, capture front-end or None) for one case."""
    try:
        case = make_case(arch, kind)
        row = check_support(case.teacher, case.student, case.samples)
    except FxkdError as exc:
        first = str(exc).splitlines()[0]
        return "refused", f"{arch}/{kind}: refused, {type(exc).__name__}: {first}", None
    except Exception as exc:  # a crash is a result too: the table says so
        return "ERROR", f"{arch}/{kind}: ERROR {type(exc).__name__}: {str(exc)[:200]}", None
    stages = f"{len(row.stages_aligned)}/{len(row.stages)}"
    onnx = "ok" if row.onnx_passed and row.onnx_same_size else "FAIL"
    mark = "✓" if row.ok else "✗"
    size = sum(p.numel() for p in case.student.parameters())
    share = size / sum(p.numel() for p in case.teacher.parameters())
    text = (
        f"{mark} {row.pairs} pairs, {row.folded} folded, stages {stages}, ONNX {onnx}, "
        f"{share:.0%} params"
    )
    reasons = "; ".join(f"{n}× {r}" for r, n in row.skip_reasons.items()) or "none"
    detail = (
        f"{arch}/{kind}: {row.pairs} pairs, {row.skipped} skipped ({reasons}), "
        f"worse {len(row.worse)}, shapes {'same' if row.same_shapes else 'CHANGED'}, "
        f"student {size:,} parameters, {row.capture} capture, {row.seconds:.0f}s"
    )
    return text, detail, row.capture


def _merged(old: str, lines: list[str], details: list[str], archs: list[str]):
    """The old table and details with the rows of ``archs`` replaced by the new ones."""
    new_rows = {ln.split("|")[1].strip(): ln for ln in lines[2:] if ln.startswith("| ")}
    new_depth = [ln for ln in lines if ln.startswith("\nDepth:")]
    table, rest = old.split("\n\ncapture: the front-end", 1)
    out = []
    for ln in table.splitlines():
        name = ln.split("|")[1].strip() if ln.startswith("| ") else None
        if name in new_rows:
            out.append(new_rows.pop(name))
        elif ln.startswith("Depth:") and new_depth:
            out.append(new_depth.pop().lstrip("\n"))
        elif ln.startswith("| ") or ln.startswith("Depth:"):
            out.append(ln)
    out += list(new_rows.values())
    first = [ln for ln in out if not ln.startswith("Depth:")]
    depth = [ln for ln in out if ln.startswith("Depth:")]
    old_details = [ln[2:] for ln in rest.split("## Details", 1)[1].splitlines() if ln[:2] == "- "]
    kept = [d for d in old_details if d.split("/")[0] not in archs]
    if new_depth or any(d.startswith(f"{DEPTH[0]}/") for d in details):
        kept = [d for d in kept if not d.startswith(f"{DEPTH[0]}/")]
    merged_details = kept + details
    return first + (["", *depth] if depth else []), merged_details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=ARCHS + HF_ARCHS)
    parser.add_argument("--kinds", nargs="+", default=KINDS)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results/zoo_support.md"
    )
    parser.add_argument(
        "--readme", action="store_true", help="update docs/supported.md's table too"
    )
    parser.add_argument("--no-depth", action="store_true", help="skip the resnet34→18 case")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the rows of --archs in an existing --out table (rerun a few)",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)

    header = "| architecture | capture | " + " | ".join(args.kinds) + " |"
    lines = [header, "| --- | --- |" + " --- |" * len(args.kinds)]
    details = []
    for arch in args.archs:
        cells, captures = [], set()
        for kind in args.kinds:
            if kind == "bn" and arch in NO_BATCHNORM:
                cells.append("n/a (no BatchNorm)")
                continue
            if kind == "decouple" and arch in NO_CONV:
                cells.append("n/a (no conv)")
                continue
            text, detail, front = cell(arch, kind)
            print(detail, flush=True)
            cells.append(text)
            details.append(detail)
            captures |= {front} - {None}
        front = "/".join(sorted(captures)) or "-"
        lines.append(f"| {arch} | {front} | " + " | ".join(cells) + " |")
    if not args.no_depth:
        text, detail, _ = cell(DEPTH[0], "depth")
        print(detail, flush=True)
        details.append(detail)
        lines.append(
            f"\nDepth: {DEPTH[0]} teacher, hand-designed {DEPTH[1]} student (cuts alignment): "
            f"{text}."
        )
    if args.merge and args.out.exists():  # keep the other architectures' rows and details
        lines, details = _merged(args.out.read_text(), lines, details, args.archs)
    table = "\n".join(lines)
    command = "python -m examples.benchmarks.zoo_support" + (" --readme" if args.readme else "")
    body = (
        f"{table}\n\ncapture: the front-end that captured the models (fx: symbolic tracing; "
        "export: torch.export). Each cell: aligned pairs, adapters folded, teacher stages (spatial "
        "resolutions) with an aligned point, onnxruntime parity + same size, the student's "
        "parameters as a share of the teacher's; ✓ when every "
        "check of fxkd.support passes (no point worse after its solve, parameter shapes "
        f"unchanged). Generated by `{command}`.\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Model-zoo support\n\n"
        + body
        + "\n## Details\n\n"
        + "\n".join(f"- {d}" for d in details)
        + "\n"
    )
    print(f"\n{table}\n\nwrote {args.out}")
    if args.readme:
        readme = ROOT / "docs" / "supported.md"
        text = readme.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"docs/supported.md has no {START} ... {END} markers")
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{START}\n{body}{END}{tail}")
        print("updated docs/supported.md")


if __name__ == "__main__":
    main()
