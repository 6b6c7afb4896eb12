"""Network decoupling (Guo et al., BMVC 2018): each regular k×k conv becomes a depthwise k×k
conv followed by a pointwise 1×1 conv, initialised from a per-input-channel SVD of the kernel."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from fxkd.errors import ConfigError
from fxkd.inputs import Inputs
from fxkd.nodes import CONV_TYPES
from fxkd.students.common import check_output_shapes

__all__ = ["decouple"]

log = logging.getLogger(__name__)


def _decoupled(conv: nn.Module, rank: int) -> nn.Sequential:
    """depthwise (C_in → rank·C_in, k) then pointwise (rank·C_in → C_out, 1): per input channel
    c, ``W[:, c] ≈ Σ_r U_r s_r V_rᵀ`` (truncated SVD of the C_out × k^d slice); the depthwise
    filters are V_r, the pointwise weights U_r·s_r. Exact when rank ≥ min(C_out, k^d)."""
    dims = conv.weight.dim() - 2
    conv_type = type(conv)
    c_out, c_in = conv.weight.shape[:2]
    taps = math.prod(conv.kernel_size)
    r = min(rank, c_out, taps)
    # per input channel c: the (C_out, k) slice W[:, c], factorised as U diag(s) Vh
    w = conv.weight.detach().double().reshape(c_out, c_in, taps).permute(1, 0, 2)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    depth_w = vh[:, :r, :].reshape(c_in * r, 1, *conv.kernel_size)
    point_w = (u[:, :, :r] * s[:, None, :r]).permute(1, 0, 2).reshape(c_out, c_in * r)
    like = {"dtype": conv.weight.dtype, "device": conv.weight.device}
    depthwise = conv_type(
        c_in,
        c_in * r,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups=c_in,
        bias=False,
        padding_mode=conv.padding_mode,
        **like,
    )
    pointwise = conv_type(c_in * r, c_out, 1, bias=conv.bias is not None, **like)
    with torch.no_grad():
        depthwise.weight.copy_(depth_w.to(conv.weight))
        pointwise.weight.copy_(point_w.reshape(c_out, c_in * r, *([1] * dims)).to(conv.weight))
        if conv.bias is not None:
            pointwise.bias.copy_(conv.bias)
    return nn.Sequential(depthwise, pointwise)


def decouple(teacher: nn.Module, *, rank: int = 1, example_inputs: Any = None) -> nn.Module:
    """A copy of ``teacher`` whose regular convs (kernel > 1, groups = 1) are each a depthwise
    conv with channel multiplier ``rank`` followed by a pointwise conv (Guo et al., BMVC 2018).

    With ``example_inputs`` (a tensor, tuple or dict, as for ``prune``) the student is checked
    to run and to compute the teacher's output shapes; a conv whose replacement breaks the
    model (code that reads ``conv.weight``, as Hugging Face's patch embeddings do) keeps its
    form, with a warning naming it."""
    if rank < 1:
        raise ConfigError(f"rank={rank!r} must be >= 1")
    student = copy.deepcopy(teacher).eval()
    targets = [
        name
        for name, m in student.named_modules()
        if isinstance(m, CONV_TYPES) and m.groups == 1 and math.prod(m.kernel_size) > 1
    ]
    originals = {name: student.get_submodule(name) for name in targets}
    decoupled = {name: _decoupled(conv, rank) for name, conv in originals.items()}
    for name in targets:
        _replace(student, name, decoupled[name])
    example = None if example_inputs is None else Inputs.example(example_inputs)
    if example is None or example.failure(student) is None:
        return _checked(teacher, student, example_inputs)
    kept = []  # one at a time: a conv whose replacement makes the model fail keeps its form
    for name in targets:
        _replace(student, name, originals[name])
    for name in targets:
        _replace(student, name, decoupled[name])
        if example.failure(student) is not None:
            _replace(student, name, originals[name])
            kept.append(name)
    log.warning(
        "decouple: %s kept as regular conv(s): the model fails with their decoupled form",
        ", ".join(kept),
    )
    return _checked(teacher, student, example_inputs)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _checked(teacher: nn.Module, student: nn.Module, example_inputs: Any) -> nn.Module:
    if example_inputs is not None:
        check_output_shapes(teacher, student, example_inputs)
    return student
