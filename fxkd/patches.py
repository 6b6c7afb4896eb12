"""im2col for Conv1d/2d/3d and Linear: the rows a producer's kernel multiplies.

For a conv with weight (C_out, C_in/G, *k), ``patches(x)`` returns (rows, G, C_in/G·Πk) with
rows = N·ΠL (output positions, row-major) and features ordered like ``weight[o].flatten()``, so
``patches(x)[:, g] @ weight[g-th block].flatten(1).T`` is the conv output without bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["patches", "rows"]


def rows(value: torch.Tensor, dims: int) -> torch.Tensor:
    """A producer's output as (rows, channels): channels last for Linear, dim 1 for conv."""
    if dims == 0:
        return value.reshape(-1, value.shape[-1])
    return value.movedim(1, -1).reshape(-1, value.shape[1])


def _padding(module: nn.Module) -> list[tuple[int, int]]:
    k, dil = module.kernel_size, module.dilation
    if module.padding == "valid":
        return [(0, 0)] * len(k)
    if module.padding == "same":
        total = [d * (kk - 1) for d, kk in zip(dil, k, strict=True)]
        return [(t // 2, t - t // 2) for t in total]
    return [(p, p) for p in module.padding]


def patches(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The producer's input as (rows, groups, features-per-group) patch matrix (zero padding)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1])
    dims = x.dim() - 2
    pads = _padding(module)
    flat = [p for pair in reversed(pads) for p in pair]
    x = F.pad(x, flat) if any(flat) else x
    for d in range(dims):
        k, s, dil = module.kernel_size[d], module.stride[d], module.dilation[d]
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    # x: (N, C, *L, *k) -> (N, *L, C, *k)
    c = x.shape[1]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    x = x.permute(order)
    g = module.groups
    return x.reshape(-1, g, (c // g) * math.prod(module.kernel_size))
