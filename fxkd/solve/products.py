"""The fp32 products of centred rows, accumulated in place and summed in fp64.

``CentredProducts`` takes rows already centred and laid out feature-major for the GEMM, ``x_c``
(P, D, R) and ``y_c`` (P, K, R), and keeps ``Σ x_c x_cᵀ`` (its lower block triangle only) and
``Σ x_c y_cᵀ``: fp32 products on the rows' device, added to fp64 sums every ``FLUSH_ROWS`` rows.
Rounding then scales with the features' spread, not their mean, and with about one GEMM's own
summation length.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["CHAIN", "SYMMETRIC_PANELS_FROM", "CentredProducts", "shifted", "work_dtype"]

SYMMETRIC_PANELS_FROM = 128
"""Features from which the Gram product skips its upper block triangle."""

CHAIN = 256
"""Rows per partial product of a small system (``chained_products``)."""


class CentredProducts:
    """Running ``Σ x_c x_cᵀ`` (P, D, D; lower block triangle, see ``panels``) and ``Σ x_c y_cᵀ``
    (P, D, K) in fp64, from fp32 (or fp64) products of centred rows."""

    FLUSH_ROWS = 1 << 17
    """fp32 product rows accumulated before they are added to the fp64 sums (about one GEMM's
    own summation length)."""

    SMALL_FEATURES = 12
    """Systems with fewer features than this take their products over chains of ``CHAIN``
    rows (``chained_products``): CPU BLAS sums an fp32 product with under 12 output rows over
    the inner dimension in one long chain (an 8-channel pointwise site, a 1-channel 3×3 stem
    with its 9 patch features), which rounds far worse than the blocked sums of wider ones."""

    def __init__(self, features: int) -> None:
        self.features = features
        self.xx: torch.Tensor | None = None  # flushed Σ x_c x_cᵀ, fp64, lower block triangle
        self.xy: torch.Tensor | None = None  # flushed Σ x_c y_cᵀ, fp64
        self._acc: tuple[torch.Tensor, torch.Tensor] | None = None  # unflushed products
        self._rows = 0
        self.cross_only = False  # skip x_cᵀx_c (a re-solve against new targets)

    @property
    def panels(self) -> list[tuple[int, int]]:
        """Row panels of the Gram product: panel [lo, hi) of x_cᵀx_c is taken against the
        features before hi only, which skips the upper block triangle (symmetric): 4 panels
        take 5/8 of the FLOPs. One panel (the full product) below ``SYMMETRIC_PANELS_FROM``
        features."""
        d = self.features
        n = 4 if d >= SYMMETRIC_PANELS_FROM else 1
        edges = [round(i * d / n) for i in range(n + 1)]
        return list(itertools.pairwise(edges))

    def add(self, xc: torch.Tensor, yc: torch.Tensor) -> None:
        """Add the products of rows ``xc`` (P, D, R) and ``yc`` (P, K, R)."""
        p, d, rows = xc.shape
        if self._acc is None or self._acc[0].dtype != xc.dtype:
            self.flush()
            like = {"dtype": xc.dtype, "device": xc.device}
            self._acc = (torch.zeros(p, d, d, **like), torch.zeros(p, d, yc.shape[1], **like))
        if self.cross_only:
            self._acc[1].baddbmm_(xc, yc.transpose(-1, -2))
        elif d < self.SMALL_FEATURES and xc.dtype == torch.float32:
            gram, cross = chained_products(xc, yc)
            self._acc[0].add_(gram)
            self._acc[1].add_(cross)
        else:
            for lo, hi in self.panels:  # lower block triangle only; the rest its transpose
                self._acc[0][:, lo:hi, :hi].baddbmm_(xc[:, lo:hi], xc[:, :hi].transpose(-1, -2))
            self._acc[1].baddbmm_(xc, yc.transpose(-1, -2))
        self._rows += rows
        if self._rows >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Add the pending products to the fp64 sums (the skipped upper triangle stays zero:
        ``mirror`` fills it once the sums are read)."""
        if self._acc is not None and self._rows:
            if self.xx is None:
                self.xx, self.xy = (a.to(torch.float64, copy=True) for a in self._acc)
            else:  # added in place, promoted to fp64 on the fly: no D×D temporary
                self.xx.add_(self._acc[0])
                self.xy.add_(self._acc[1])
            self._acc[0].zero_()
            self._acc[1].zero_()
        self._rows = 0

    def mirror(self, gram: torch.Tensor) -> None:
        """Fill the upper block triangle of a (P, D, D) Gram view that the panels skipped."""
        for lo, hi in self.panels[:-1]:
            gram[:, lo:hi, hi:] = gram[:, hi:, lo:hi].transpose(-1, -2)

    def reset(self) -> None:
        """Forget the sums (they were reduced over ranks into a base elsewhere)."""
        self.xx = self.xy = None


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMMs' dtype: fp64 for fp64 data, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chained_products(xc: torch.Tensor, yc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``xc xcᵀ`` (P, D, D) and ``xc ycᵀ`` (P, D, K) of rows ``xc`` (P, D, R), ``yc`` (P, K, R)
    as one batched product per ``CHAIN`` rows, the partial products then summed (a cascade):
    each fp32 chain is at most ``CHAIN`` long whatever kernel the BLAS picks."""
    p, d, rows = xc.shape
    whole = rows - rows % CHAIN
    xb = xc[..., :whole].view(p, d, -1, CHAIN).transpose(1, 2)  # (P, B, D, CHAIN)
    yb = yc[..., :whole].view(p, yc.shape[1], -1, CHAIN).transpose(1, 2)
    gram = torch.matmul(xb, xb.transpose(-1, -2)).sum(dim=1)
    cross = torch.matmul(xb, yb.transpose(-1, -2)).sum(dim=1)
    if whole < rows:  # the last, shorter chain
        tail = xc[..., whole:]
        gram.baddbmm_(tail, tail.transpose(-1, -2))
        cross.baddbmm_(tail, yc[..., whole:].transpose(-1, -2))
    return gram, cross


def shifted(v: torch.Tensor, shift64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` (B, P, F, L) minus ``shift`` (P, 1, F), as a contiguous (P, F, B·L) tensor: one
    pass that shifts and lays the rows out for the GEMM."""
    b, p, f, length = v.shape
    out = torch.empty(p, f, b, length, dtype=dtype, device=v.device)
    shift = shift64.to(dtype).transpose(-1, -2)[None]  # (1, P, F, 1)
    torch.sub(v.to(dtype), shift, out=out.permute(2, 0, 1, 3))
    return out.view(p, f, b * length)
