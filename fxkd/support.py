"""Does fxkd support this teacher/student pair? One call that runs ``compress`` and checks what
a user relies on, for the model-zoo table and for one's own models.

``check_support(teacher, student, samples)`` compresses and reports:

- pairs / skipped: aligned sites and producers left out (each with its reason in the report);
- stages: the spatial resolutions of the teacher's feature maps, and which have at least one
  aligned point (a stage with none would not be corrected at all);
- folded: adapters merged into their producer (no adapter module left), and whether the
  parameter count and every parameter's shape equal the student's as given;
- worse: sites whose error after their solve exceeds the error of the same point with an
  identity adapter (``err_before``: the student's own layer fed by the already-corrected
  student) — the solve minimises ``||XW − Y||² + λ||W − W0||²`` with ``W0`` that layer, so this
  must be none, up to fp32 rounding;
- onnx: onnxruntime parity of the exported result and the structural size check;
- capture: the front-end that captured the models (``"fx"`` or ``"export"``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fxkd.api import CompressResult, compress
from fxkd.capture import capture, node_shape
from fxkd.inputs import Inputs
from fxkd.passes.adapter import ADAPTER_TYPES

__all__ = ["SupportRow", "check_support", "stage_sizes"]

WORSE_TOLERANCE = 1e-3
"""Relative slack on "not worse", for fp32 rounding of the features."""


@dataclass
class SupportRow:
    """The outcome of ``check_support`` for one teacher/student pair."""

    pairs: int
    skipped: int
    stages: list[tuple[int, ...]]
    stages_aligned: list[tuple[int, ...]]
    folded: int
    same_shapes: bool
    worse: list[str]
    onnx_passed: bool | None
    onnx_same_size: bool | None
    seconds: float
    capture: str = "fx"
    skip_reasons: dict[str, int] = field(default_factory=dict)
    result: CompressResult | None = None

    @property
    def ok(self) -> bool:
        return (
            self.pairs > 0
            and self.stages_aligned == self.stages
            and self.folded == self.pairs
            and self.same_shapes
            and not self.worse
            and self.onnx_passed is not False
            and self.onnx_same_size is not False
        )


def stage_sizes(gm: torch.fx.GraphModule) -> list[tuple[int, ...]]:
    """The distinct spatial sizes of the 4-D/5-D (or 3-D) feature maps in a traced graph, in
    order of appearance: a CNN's stages."""
    sizes: list[tuple[int, ...]] = []
    for node in gm.graph.nodes:
        shape = node_shape(node)
        if (
            node.op == "call_module"
            and shape is not None
            and len(shape) >= 3
            and isinstance(gm.get_submodule(str(node.target)), (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and tuple(shape[2:]) not in sizes
        ):
            sizes.append(tuple(shape[2:]))
    return sizes


def check_support(
    teacher: nn.Module,
    student: nn.Module,
    samples: torch.Tensor | Inputs,
    *,
    onnx: bool = True,
    keep_result: bool = False,
    **options,
) -> SupportRow:
    """Compress ``student`` towards ``teacher`` on ``samples`` and check the outcome (options
    go to ``compress``)."""
    options.setdefault("progress", False)
    options.setdefault("num_samples", len(samples))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = compress(
            teacher, student, samples, onnx=Path(tmp) / "s.onnx" if onnx else None, **options
        )
    seconds = time.perf_counter() - t0
    rows = result.report.calibrated
    method = result.report.capture
    teacher_gm = capture(
        teacher, Inputs.of(samples)[:2], method=method, leaf_modules=options.get("leaf_modules", ())
    )
    stages = stage_sizes(teacher_gm)
    shapes = {n.name: node_shape(n) for n in teacher_gm.graph.nodes}
    aligned = {
        tuple(shapes[p.teacher_point][2:])
        for p in result.alignment.pairs
        if shapes.get(p.teacher_point) is not None and len(shapes[p.teacher_point]) >= 3
    }
    given = {k: tuple(v.shape) for k, v in student.named_parameters()}
    got = {k: tuple(v.shape) for k, v in result.model.named_parameters()}
    same_shapes = sorted(given.values()) == sorted(got.values()) and not any(
        isinstance(m, ADAPTER_TYPES) for m in result.model.modules()
    )
    worse = [
        r.student
        for r in rows
        if r.err_before is not None and r.err_after > r.err_before * (1 + WORSE_TOLERANCE) + 1e-7
    ]
    reasons: dict[str, int] = {}
    for s in result.alignment.skipped:
        key = s.reason.split(";")[0].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return SupportRow(
        pairs=len(result.alignment.pairs),
        skipped=len(result.alignment.skipped),
        stages=stages,
        stages_aligned=[s for s in stages if s in aligned],
        folded=sum(r.folded for r in rows),
        same_shapes=same_shapes,
        worse=worse,
        onnx_passed=None if result.onnx is None else result.onnx.passed,
        onnx_same_size=None if result.onnx is None else result.onnx.same_size,
        seconds=seconds,
        capture=method,
        skip_reasons=reasons,
        result=result if keep_result else None,
    )
