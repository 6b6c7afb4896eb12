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

__all__ = [
    "blocks",
    "centred_patch_rows",
    "conv_padding",
    "patch_blocks",
    "patch_mask",
    "patches",
    "rows",
    "summed_patches",
]


def rows(value: torch.Tensor, dims: int) -> torch.Tensor:
    """A producer's output as (rows, channels): channels last for Linear, dim 1 for conv."""
    if dims == 0:
        return value.reshape(-1, value.shape[-1])
    return value.movedim(1, -1).reshape(-1, value.shape[1])


def blocks(value: torch.Tensor, dims: int, groups: int) -> torch.Tensor:
    """A layer's output feature-major as (B, groups, channels/groups, L), rows = B·L: a view of
    a conv's (N, C, *S) output, or of a Linear's (..., C) output transposed (B = 1)."""
    if dims == 0:
        flat = value.reshape(-1, value.shape[-1])
        return flat.transpose(0, 1).reshape(groups, -1, flat.shape[0])[None]
    return value.reshape(value.shape[0], groups, value.shape[1] // groups, -1)


def patch_blocks(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The producer's input patches feature-major: (B, groups, features-per-group, L), the
    layout ``NormalEquations.update_blocks`` takes, features ordered like ``weight[o].flatten()``
    within each group. F.unfold's output for 2-D convs with symmetric padding (no extra copy);
    otherwise Tensor.unfold per spatial dimension and one reshape."""
    if isinstance(module, nn.Linear):
        return blocks(x, 0, 1)
    n, c, dims, g = x.shape[0], x.shape[1], x.dim() - 2, module.groups
    pads = conv_padding(module)
    if dims == 2 and all(lo == hi for lo, hi in pads):
        cols = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=tuple(lo for lo, _ in pads),
            stride=module.stride,
        )  # (N, C·kh·kw, L)
        return cols.view(n, g, -1, cols.shape[-1])
    flat = [p for pair in reversed(pads) for p in pair]
    x = F.pad(x, flat) if any(flat) else x
    for d in range(dims):
        k, s, dil = module.kernel_size[d], module.stride[d], module.dilation[d]
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    # x: (N, C, *L, *k) -> (N, C, *k, *L) -> (N, G, C/G·Πk, ΠL)
    x = x.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    return x.reshape(n, g, (c // g) * math.prod(module.kernel_size), -1)


def centred_patch_rows(
    x: torch.Tensor, module: nn.Module, mu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The im2col patches of ``x − μ`` (``mu``: one shift per input channel, zero padding) laid
    out for the GEMM: contiguous (G, C/G·Πk, N·ΠL), features ordered like ``weight[o].flatten()``
    per group, rows (sample, position) like ``patch_blocks``; the (ΠL, Πk) mask ``m`` of the
    kernel offsets that read inside the input at each output position (the patches of ``x``
    itself are ``cols + μ_f·m[l, k(f)]``, ``k(f)`` = f mod Πk); and ``x − μ`` summed over the
    samples, (C, *S) in fp64 (its patches, ``summed_patches``, are the patches' sums over the
    samples).

    One pass writes the centred input, channels first, into a buffer whose padding alone is
    zeroed; one strided copy of its unfolded view is the patch matrix (F.unfold + a
    shift-and-transpose copy take two passes over the Πk-times larger patches)."""
    n, c, dims, g = x.shape[0], x.shape[1], x.dim() - 2, module.groups
    pads = conv_padding(module)
    spatial = x.shape[2:]
    buf = x.new_empty(c, n, *[s + lo + hi for s, (lo, hi) in zip(spatial, pads, strict=True)])
    for d, (s, (lo, hi)) in enumerate(zip(spatial, pads, strict=True)):
        buf.narrow(2 + d, 0, lo).zero_()
        buf.narrow(2 + d, lo + s, hi).zero_()
    inside = [slice(lo, lo + s) for s, (lo, _) in zip(spatial, pads, strict=True)]
    inner = buf[(slice(None), slice(None), *inside)]
    torch.sub(x.transpose(0, 1), mu.to(x).view(c, 1, *[1] * dims), out=inner)
    features = (c // g) * math.prod(module.kernel_size)
    cols = _windows(buf, module).reshape(g, features, -1)  # the one copy
    return cols, patch_mask(module, spatial, x.device), inner.sum(dim=1, dtype=torch.float64)


def summed_patches(total: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The im2col patches of one (C, *S) input ``total`` (e.g. the centred inputs summed over
    the samples), zero padding, as (G, C/G·Πk, ΠL) like ``centred_patch_rows``' sums."""
    pads = conv_padding(module)
    flat = [p for pair in reversed(pads) for p in pair]
    padded = F.pad(total, flat) if any(flat) else total
    features = (total.shape[0] // module.groups) * math.prod(module.kernel_size)
    return _windows(padded[:, None], module).reshape(module.groups, features, -1)


def patch_mask(module: nn.Module, spatial, device) -> torch.Tensor:
    """The (ΠL, Πk) fp64 mask of the kernel offsets that read inside an input of size
    ``spatial`` (not padding) at each output position, positions and offsets row-major."""
    masks = _in_bounds(module, conv_padding(module), spatial, device)
    mask = masks[0].to(torch.float64)
    for m in masks[1:]:  # row-major over positions and over offsets
        mask = (mask[:, None, :, None] * m.to(mask)[None, :, None, :]).flatten(2).flatten(0, 1)
    return mask


def _windows(buf: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The kernel windows of a padded channels-first buffer (C, N, *padded) as a
    (C, *k, N, *L) view."""
    dims = buf.dim() - 2
    view = buf
    for d in range(dims):
        k, s, dil = module.kernel_size[d], module.stride[d], module.dilation[d]
        view = view.unfold(2 + d, dil * (k - 1) + 1, s)
        if dil > 1:
            view = view[..., ::dil]
    return view.permute(0, *range(2 + dims, 2 + 2 * dims), 1, *range(2, 2 + dims))


def _in_bounds(module: nn.Module, pads, spatial, device) -> list[torch.Tensor]:
    """Per spatial dimension, the (L_d, k_d) mask of the kernel offsets that read inside the
    input (not padding) at each output position."""
    masks = []
    for d, size in enumerate(spatial):
        k, s, dil = module.kernel_size[d], module.stride[d], module.dilation[d]
        positions = (size + sum(pads[d]) - dil * (k - 1) - 1) // s + 1
        reads = torch.arange(positions, device=device)[:, None] * s - pads[d][0]
        reads = reads + torch.arange(k, device=device)[None, :] * dil
        masks.append((reads >= 0) & (reads < size))
    return masks


def patches(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The producer's input as a (rows, groups, features-per-group) patch matrix (zero padding),
    rows = N·ΠL row-major: ``patch_blocks`` laid out row by row."""
    b = patch_blocks(x, module)
    return b.permute(0, 3, 1, 2).reshape(-1, b.shape[1], b.shape[2])


def conv_padding(module: nn.Module) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial dimension, "valid" and "same" resolved."""
    k, dil = module.kernel_size, module.dilation
    if module.padding == "valid":
        return [(0, 0)] * len(k)
    if module.padding == "same":
        total = [d * (kk - 1) for d, kk in zip(dil, k, strict=True)]
        return [(t // 2, t - t // 2) for t in total]
    return [(p, p) for p in module.padding]
