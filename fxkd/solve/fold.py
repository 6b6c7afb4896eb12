"""Tensor algebra of folding: adapters and BatchNorm merge into the producing conv/linear.

A site computes an affine map of the producer's input ``z``: ``site(z) = A z + a`` where, for a
producer (W, b) followed by an eval BatchNorm with scale ``s = γ/√(σ²+ε)``, shift β, mean μ::

    A = diag(s)·W,   a = s⊙(b − μ) + β            (A = W, a = b without BatchNorm)

A pointwise adapter (Q block-diagonal over the producer's groups, bias c) composes as
``A' = Q·A`` (per group, every kernel tap), ``a' = Q·a + c``; kernel mode solves (A', a')
directly. Writing (A', a') back keeps every parameter's shape: without BatchNorm ``W ← A'``,
``b ← a'``; with it the BatchNorm stays, ``W ← diag(s)⁻¹·A'`` and ``β ← a' − s⊙(b − μ)``.
All arithmetic is fp64; results are cast to the parameters' dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

__all__ = [
    "batchnorm_scale",
    "compose_pointwise",
    "effective_affine",
    "fuse_batchnorm",
    "write_effective_affine",
]


def batchnorm_scale(bn: nn.Module) -> torch.Tensor:
    """``s = γ/√(σ²+ε)`` in fp64 (γ = 1 when the BatchNorm has no affine weight)."""
    s = torch.rsqrt(bn.running_var.double() + bn.eps)
    return s * bn.weight.double() if bn.weight is not None else s


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def effective_affine(
    producer: nn.Module, bn: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, a) in fp64: the site's value is ``A z + a`` (A shaped like the producer's weight)."""
    w = producer.weight.detach().double()
    b = producer.bias.detach().double() if producer.bias is not None else w.new_zeros(w.shape[0])
    if bn is None:
        return w, b
    s = batchnorm_scale(bn).to(w.device)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(s)
    return _per_row(s, w) * w, s * (b - bn.running_mean.double()) + beta


def compose_pointwise(
    a_mat: torch.Tensor, a_vec: torch.Tensor, q: torch.Tensor, c: torch.Tensor | None, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q·A, Q·a + c)`` for Q given as a grouped 1x1 weight (C, C/groups), per group."""
    c_out = a_mat.shape[0]
    k = c_out // groups
    qb = q.double().reshape(groups, k, k)
    new_a = torch.bmm(qb, a_mat.reshape(groups, k, -1)).reshape(a_mat.shape)
    new_v = torch.bmm(qb, a_vec.reshape(groups, k, 1)).reshape(c_out)
    if c is not None:
        new_v = new_v + c.double()
    return new_a, new_v


def write_effective_affine(
    producer: nn.Module, bn: nn.Module | None, a_mat: torch.Tensor, a_vec: torch.Tensor
) -> None:
    """Write (A', a') into the producer (and the BatchNorm's shift), shapes unchanged.

    Raises ValueError when it cannot be done without changing a shape: a bias to write where
    the producer has none, a BatchNorm without affine shift, or a zero BatchNorm scale."""
    with torch.no_grad():
        w = producer.weight
        if bn is None:
            if producer.bias is None:
                if a_vec.abs().max() > 0:
                    raise ValueError("the producer has no bias to hold the adapter's bias")
            else:
                producer.bias.copy_(a_vec.to(producer.bias))
            w.copy_(a_mat.to(w))
            return
        if bn.bias is None:
            raise ValueError("the BatchNorm has no affine shift to hold the bias")
        s = batchnorm_scale(bn).to(a_mat.device)
        if (s.abs() <= s.abs().max() * 1e-12).any():
            raise ValueError("a BatchNorm scale is zero; fuse the BatchNorm first (FoldBatchNorm)")
        b = producer.bias.detach().double() if producer.bias is not None else torch.zeros_like(s)
        w.copy_((a_mat / _per_row(s, a_mat)).to(w))
        bn.bias.copy_((a_vec - s * (b - bn.running_mean.double())).to(bn.bias))


def fuse_batchnorm(producer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new conv/linear computing ``bn(producer(z))`` in eval mode (torch.nn.utils.fusion)."""
    flags = producer.training, bn.training
    producer.eval()
    bn.eval()
    try:
        if isinstance(producer, nn.Linear):
            return fuse_linear_bn_eval(producer, bn)
        return fuse_conv_bn_eval(producer, bn)
    finally:
        producer.train(flags[0])
        bn.train(flags[1])
