"""``fxkd.compress``: the whole pipeline in one call. Orchestration only: the graph surgery lives
in the passes, the algebra in fxkd.solve.fold / fxkd.solve.normal."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxkd.align import Alignment, align
from fxkd.capture import capture, capture_all
from fxkd.config import CompressConfig
from fxkd.data import take_inputs
from fxkd.errors import ConfigError
from fxkd.onnx import ValidationReport, export_onnx_counted, exported_elements, validate_onnx
from fxkd.passes import CalibrateAdapters, FoldAdapters, FoldBatchNorm, InsertAdapters
from fxkd.passes.memory import MemoryEstimate
from fxkd.placement import module_device, module_dtype, to_module
from fxkd.polish import polish
from fxkd.report import BlockRow, Report
from fxkd.students import channel_maps_of

__all__ = ["CompressResult", "compress"]

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    """What ``compress`` returns.

    model: the recovered student (a GraphModule, eval mode), adapters folded away.
    report: the per-block table (``print(result.report)``).
    onnx: the onnxruntime validation report when ``onnx=`` was given, else None.
    alignment: which student sites were paired with which teacher points.
    memory: calibration's memory estimate, checked before it ran (``fxkd.passes.memory``).
    """

    model: fx.GraphModule
    report: Report
    onnx: ValidationReport | None
    alignment: Alignment
    memory: MemoryEstimate | None = None


_HALF = (torch.float16, torch.bfloat16)


def _at_least_fp32(module: nn.Module) -> nn.Module:
    """The module itself, or an fp32 deep copy when it is fp16/bf16 (the original untouched)."""
    if module_dtype(module) in _HALF:
        return copy.deepcopy(module).float()
    return module


def compress(
    teacher: nn.Module,
    student: nn.Module,
    loader: Any,
    *,
    config: CompressConfig | None = None,
    onnx: str | os.PathLike | None = None,
    **options: Any,
) -> CompressResult:
    """Recover ``student`` towards ``teacher`` from a few unlabelled samples of ``loader``.

    ``loader`` yields tensors, ``(input, label, ...)`` tuples or dicts (labels are ignored); a
    tensor of samples works too. A dict's entries named like ``teacher.forward``'s parameters
    are keyword inputs (``input_ids`` + ``attention_mask``), a tuple's leading tensors the
    required positional ones (see :func:`fxkd.inputs.bind_batch`); integer inputs are fine.
    Options are CompressConfig fields, given whole (``config=``)
    or as keywords (``num_samples=256, mode="kernel", ...``), keywords winning. With ``onnx=``
    the result is exported there and validated with onnxruntime on the samples.

    Neither ``teacher`` nor ``student`` is modified (the student is deep-copied; training flags
    are restored). fp16/bf16 models are calibrated as fp32 copies and the result is returned in
    the student's dtype; fp64 models calibrate in fp64."""
    if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
        raise ConfigError("teacher and student must be torch.nn.Module instances")
    cfg = (config or CompressConfig()).replace(**options)
    samples = take_inputs(loader, cfg.num_samples, key=cfg.input_key, seed=cfg.seed, model=teacher)
    device = torch.device(cfg.device) if cfg.device else module_device(student)
    # shapes, alignment and export need a batch, not the samples: ShapeProp runs the model on
    # it (three traces; on a 64-sample chunk they cost as much as the calibration's forwards)
    example = samples[:2]

    # half-precision models calibrate as fp32 copies; the result returns in the student's dtype
    out_dtype = module_dtype(student)
    teacher_run = _at_least_fp32(teacher)
    student_run = _at_least_fp32(student)
    work = copy.deepcopy(student_run).to(device)
    models = (teacher_run, student_run, work)
    (teacher_gm, reference, student_gm), method = capture_all(
        models,
        [to_module(example, m) for m in models],
        method=cfg.capture,
        leaf_modules=cfg.leaf_modules,
    )
    maps, source = dict(cfg.channel_maps), "given"
    if not maps:
        maps, source = channel_maps_of(student), "builder"
    alignment = align(
        teacher_gm, student_gm, channel_maps=maps, granularity=cfg.granularity, map_source=source
    )
    log.info("%s", alignment)

    insert = InsertAdapters(alignment, cfg.mode)
    insert(student_gm)
    calibrate = CalibrateAdapters(teacher_gm, samples, cfg, reference=reference)
    calibrate(student_gm)
    if calibrate.selected:  # the maps channel selection chose (CompressConfig.select_channels)
        alignment = dataclasses.replace(
            alignment, pairs=[calibrate.selected.get(p.site.module, p) for p in alignment.pairs]
        )
    adapter_of = {
        m.pair.site.producer: name
        for name, m in student_gm.named_children()
        if name in calibrate.records
    }
    fold = FoldAdapters()
    fold(student_gm)
    if cfg.polish_steps:
        student_gm = polish(
            teacher_gm,
            student_gm,
            samples,
            alignment,
            steps=cfg.polish_steps,
            lr=cfg.polish_lr,
            batch_size=cfg.chunk_size,
            seed=cfg.seed,
            progress=cfg.progress,
        )
    if cfg.fold_batchnorm:
        FoldBatchNorm()(student_gm)
    student_gm.eval()
    if out_dtype in _HALF:
        student_gm.to(out_dtype)

    report = _report(alignment, insert, calibrate, fold, adapter_of, cfg, len(samples))
    report.capture = method
    validation = None
    if onnx is not None:
        path, elements = export_onnx_counted(student_gm, to_module(example, student_gm), onnx)
        original = copy.deepcopy(student).to(device)
        if cfg.fold_batchnorm:
            original = capture(
                original,
                to_module(example, original),
                method=method,
                leaf_modules=cfg.leaf_modules,
            )
            FoldBatchNorm()(original)
        validation = validate_onnx(
            path,
            student_gm,
            to_module(samples, student_gm),
            atol=cfg.onnx_atol,
            rtol=cfg.onnx_rtol,
            weight_elements=elements,
            reference_elements=exported_elements(original, to_module(example, original)),
        )
    return CompressResult(student_gm, report, validation, alignment, calibrate.memory)


def _report(alignment, insert, calibrate, fold, adapter_of, cfg, num_samples) -> Report:
    report = Report(alignment.strategy, cfg.mode, num_samples)
    not_inserted = {s.node: s.reason for s in insert.skipped}
    for pair in alignment.pairs:
        site = pair.site
        channels = str(site.channels)
        if pair.channel_map:  # kept/teacher channels, and where the map came from
            channels = f"{site.channels}/{pair.teacher_channels} {pair.map_source}"
        name = adapter_of.get(site.producer)
        if name is None:
            report.rows.append(
                BlockRow(
                    site.point,
                    pair.teacher_point,
                    channels,
                    note=not_inserted.get(site.producer, "not calibrated"),
                )
            )
            continue
        rec = calibrate.records[name]
        reason = fold.outcome.get(name)
        notes = [f"not folded: {reason}"] if reason else []
        if cfg.mode == "kernel" and rec.solved_as == "pointwise":
            notes.append("kernel system underdetermined: solved pointwise")
        if rec.rows < rec.unknowns:
            notes.append(
                f"underdetermined: {rec.rows} rows for {rec.unknowns} unknowns per "
                "output, the ridge keeps it near the student as given"
            )
        report.rows.append(
            BlockRow(
                site.point,
                pair.teacher_point,
                channels,
                name,
                rec.err_given,
                rec.err_before,
                rec.err_after,
                folded=reason is None,
                note="; ".join(notes),
                conditioning=rec.conditioning,
                relaxed=rec.relaxed,
                ridge=rec.ridge,
            )
        )
    for s in alignment.skipped:
        report.rows.append(BlockRow(s.node, None, "-", note=f"skipped: {s.reason}"))
    return report
