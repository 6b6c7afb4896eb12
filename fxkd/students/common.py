"""Helpers shared by the student builders: choosing the kept channels and slicing layers."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["kept_channels", "slice_batchnorm", "slice_inputs", "slice_outputs"]


def kept_channels(scores: torch.Tensor, ratio: float, segments: int) -> list[int] | None:
    """The channels kept: in each of ``segments`` equal segments, the highest-scoring
    ``s − floor(s·ratio)`` (at least one); None when nothing would be removed."""
    size = len(scores) // segments
    drop = min(math.floor(size * ratio), size - 1)
    if drop <= 0:
        return None
    kept = []
    for s in range(segments):
        seg = scores[s * size : (s + 1) * size]
        kept += sorted(int(i) + s * size for i in seg.argsort(descending=True)[: size - drop])
    return kept


def slice_outputs(conv: nn.Module, kept: torch.Tensor, depthwise: bool = False) -> None:
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[kept].clone())
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias[kept].clone())
    conv.out_channels = len(kept)
    if depthwise:
        conv.in_channels = conv.groups = len(kept)


def slice_inputs(conv: nn.Module, kept: list[int], channels: int) -> None:
    """Keep input channels ``kept`` of ``channels`` (of a conv: per group, the local indices
    kept; of a Linear: its input features)."""
    if isinstance(conv, nn.Linear):
        with torch.no_grad():
            conv.weight = nn.Parameter(conv.weight[:, torch.tensor(kept)].clone())
        conv.in_features = len(kept)
        return
    g = conv.groups
    per = channels // g
    local = [[k % per for k in kept if k // per == grp] for grp in range(g)]
    out_per = conv.out_channels // g
    with torch.no_grad():
        parts = [
            conv.weight[grp * out_per : (grp + 1) * out_per][:, torch.tensor(idx)]
            for grp, idx in enumerate(local)
        ]
        conv.weight = nn.Parameter(torch.cat(parts).clone())
    conv.in_channels = len(kept)


def slice_batchnorm(bn: nn.Module, kept: torch.Tensor) -> None:
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight = nn.Parameter(bn.weight[kept].clone())
            bn.bias = nn.Parameter(bn.bias[kept].clone())
        if bn.running_mean is not None:
            bn.running_mean = bn.running_mean[kept].clone()
            bn.running_var = bn.running_var[kept].clone()
    bn.num_features = len(kept)
