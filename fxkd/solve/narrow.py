"""Least squares over features that are an affine image of narrower ones, solved at the narrow
side.

A projected pointwise site (``fxkd.solve.projection``) has features ``x = A h + a`` with A (D', D),
D < D' (a bottleneck's expansion: D' = 2048, D = 256 in a pruned resnet50), and its normal
equations are held as the sums over h, ``G_h = Σ [h 1][h 1]ᵀ`` and ``B_h = Σ [h 1] yᵀ`` over n
rows. The system over x never needs forming. Its bias carries no ridge, so eliminating it leaves
the centred scatter ``A C Aᵀ`` with ``C = Σ (h − h̄)(h − h̄)ᵀ`` and ``C_y = Σ (h − h̄)(y − ȳ)ᵀ``::

    (A C Aᵀ + λI) W = A C_y + λ W0,     c = ȳ − x̄ᵀ W,     x̄ = A h̄ + a

With ``W = W0 + V`` the right side is ``A R``, ``R = C_y − C Aᵀ W0``, and since
``(A C Aᵀ + λI) A = A (C AᵀA + λI)`` (push-through)::

    V = A (C AᵀA + λI)⁻¹ R

one D×D solve instead of a D'×D' factorisation and its triangular solves: O(D'·D·(D + K))
instead of O(D'²·(D' + K)). ``C AᵀA`` is similar to the PSD ``C^½ AᵀA C^½``, so the eigenvalues
of ``Z = C AᵀA + λI`` are at least λ > 0: Z is nonsingular (solved by LU).

The diagnosis reads the same spectrum: the live features' correlation ``R_x = S^-½ A Σ Aᵀ S^-½``
(Σ = C/n, S = diag of ``A Σ Aᵀ``, the variances) has the nonzero eigenvalues of the D×D
``Σ^½ Aᵀ S⁻¹ A Σ^½`` and L − D more zeros when L > D live features: D' − D of the features are
dependent by construction. Without a bias the moments are uncentred (h̄ = 0, no c), as in
``NormalEquations``.

A joint system at a residual add (two projected members) has a block-diagonal A: its products
are taken block by block (``BlockAffine``), 2.9× fewer FLOPs at resnet50's last downsampling
add (D' = 4096, D = 256 + 1024).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BlockAffine", "correlation_spectra", "live_features", "narrow_solve"]


class BlockAffine:
    """``x = A h + a`` from a mapping ``M`` (P, D'[+1], D[+1]) = ``[[A, a], [0, 1]]`` (with a
    bias, else A) whose A is block diagonal with blocks of ``sizes`` (rows, columns), in order
    (one block: the whole of A). The blocks are views of M."""

    def __init__(self, mapping: torch.Tensor, bias: bool, sizes: Sequence[tuple[int, int]] = ()):
        self.mapping, self.bias = mapping, bias
        a_mat = mapping[:, :-1, :-1] if bias else mapping
        self.shift = mapping[:, :-1, -1] if bias else None
        self.rows, self.cols = a_mat.shape[1], a_mat.shape[2]
        sizes = list(sizes) or [(self.rows, self.cols)]
        if (sum(r for r, _ in sizes), sum(c for _, c in sizes)) != (self.rows, self.cols):
            raise ValueError(f"blocks {sizes} do not tile A {tuple(a_mat.shape[1:])}")
        self.blocks = []  # (rows, columns, A_b)
        r0 = c0 = 0
        for r, c in sizes:
            rows, cols = slice(r0, r0 + r), slice(c0, c0 + c)
            self.blocks.append((rows, cols, a_mat[:, rows, cols]))
            r0, c0 = r0 + r, c0 + c

    def times(self, v: torch.Tensor, add: torch.Tensor | None = None, out=None) -> torch.Tensor:
        """A v (+ ``add``): (P, D, K) → (P, D', K), written into ``out`` when given."""
        if out is None:
            out = v.new_empty(v.shape[0], self.rows, v.shape[-1])
        for rows, cols, a in self.blocks:
            if add is None:
                torch.bmm(a, v[:, cols], out=out[:, rows])
            else:
                torch.baddbmm(add[:, rows], a, v[:, cols], out=out[:, rows])
        return out

    def t_times(self, v: torch.Tensor) -> torch.Tensor:
        """Aᵀ v: (P, D', K) → (P, D, K)."""
        return torch.cat([a.transpose(-1, -2) @ v[:, rows] for rows, _, a in self.blocks], dim=1)

    def diagonal(self, moments: torch.Tensor) -> torch.Tensor:
        """diag(A S Aᵀ) (P, D') for symmetric S (P, D, D): only S's diagonal blocks are read."""
        return torch.cat(
            [((a @ moments[:, cols, cols]) * a).sum(dim=-1) for _, cols, a in self.blocks], dim=1
        )

    def gram(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """AᵀA (P, D, D), or Aᵀ diag(weights) A for weights (P, D'): block diagonal."""
        p = self.blocks[0][2].shape[0]
        out = self.blocks[0][2].new_zeros(p, self.cols, self.cols)
        for rows, cols, a in self.blocks:
            wa = a if weights is None else a * weights[:, rows, None]
            out[:, cols, cols] = a.transpose(-1, -2) @ wa
        return out


def _scatter(gram: torch.Tensor, bias: bool):
    """(C, Σh, n): the scatter of h about its mean, the sums and the row count (with a bias;
    else the uncentred moments, None, None)."""
    if not bias:
        return gram, None, None
    d = gram.shape[-1] - 1
    n = gram[:, d, d].clamp_min(1.0)  # Σ 1·1: the row count
    h_sum = gram[:, :d, d]
    return gram[:, :d, :d] - h_sum[:, :, None] * (h_sum / n[:, None])[:, None, :], h_sum, n


def _feature_diagonal(gram: torch.Tensor, affine: BlockAffine) -> torch.Tensor:
    """(P, D') diagonal of the uncentred Gram over x without forming it:
    ``diag(A G_hh Aᵀ) + 2 a ⊙ (A Σh) + n a²``."""
    d = affine.cols
    diag = affine.diagonal(gram[:, :d, :d])
    if affine.bias:
        h_sum, n = gram[:, :d, d], gram[:, d, d]
        shift = affine.shift
        diag = diag + 2 * shift * affine.times(h_sum[:, :, None])[..., 0] + n[:, None] * shift**2
    return diag


def narrow_solve(
    gram: torch.Tensor,
    cross: torch.Tensor,
    affine: BlockAffine,
    ridge: float,
    prior: torch.Tensor | None,
) -> tuple[torch.Tensor, bool]:
    """The (P, D'[+1], K) ridge solution over x from the sums over h (fp64), the same system
    as ``NormalEquations.solve`` on the mapped sums: λ = ``ridge`` · mean(diag G_x), shrunk
    towards ``prior``'s feature rows, no ridge on the bias. Returns (W, ok): ok is False when
    the D×D solve failed or gave non-finite values (the caller falls back to the wide form)."""
    lam = ridge * _feature_diagonal(gram, affine).mean(dim=-1)
    lam = lam.clamp_min(torch.finfo(torch.float64).tiny)
    scatter, h_sum, n = _scatter(gram, affine.bias)
    cross_scatter = cross
    if affine.bias:  # C_y = Σ h yᵀ − Σh ȳᵀ
        y_mean = cross[:, -1] / n[:, None]
        cross_scatter = cross[:, :-1] - h_sum[:, :, None] * y_mean[:, None, :]
    if prior is None:
        w0 = gram.new_zeros(gram.shape[0], affine.rows, cross.shape[-1])
    else:
        w0 = prior[:, : affine.rows].to(gram)
    residual = cross_scatter - scatter @ affine.t_times(w0)  # R = C_y − C Aᵀ W0
    z = scatter @ affine.gram()  # C AᵀA + λI
    torch.diagonal(z, dim1=-2, dim2=-1).add_(lam[:, None])
    v, info = torch.linalg.solve_ex(z, residual)
    w = gram.new_empty(gram.shape[0], affine.rows + int(affine.bias), cross.shape[-1])
    affine.times(v, add=w0, out=w[:, : affine.rows])  # W0 + A V, in place
    if affine.bias:  # c = ȳ − x̄ᵀ W
        x_mean = affine.times((h_sum / n[:, None])[:, :, None])[..., 0] + affine.shift
        torch.baddbmm(y_mean[:, None, :], x_mean[:, None, :], w[:, :-1], alpha=-1, out=w[:, -1:])
    ok = not bool((info != 0).any()) and bool(torch.isfinite(w).all())
    return w, ok


def live_features(var: torch.Tensor) -> torch.Tensor:
    """Which of the (P, D) variances (any common scale) belong to live features: above the
    largest one's fp64 epsilon, per system; the rest are dead (constant on the samples)."""
    return var > var.amax(dim=-1, keepdim=True) * torch.finfo(torch.float64).eps


PIVOT_SPREAD = 1e-8
"""Smallest Cholesky pivot of K = Aᵀ S⁻¹ A, relative to its largest, at which the spectrum is
read as eigvalsh(Lᵀ C L); below it (or K singular: fewer live outputs than inputs) through
an eigendecomposition of C, whose rounding does not grow with K's condition."""


def correlation_spectra(
    gram: torch.Tensor, affine: BlockAffine
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which features of x are live (P, D') and, per system, the eigenvalues of ``Σ^½ K Σ^½``
    (P, D), K = Aᵀ S⁻¹ A over the live features, ascending: the nonzero part of the live
    correlation matrix's spectrum (module docstring). Live: ``live_features``. With K = L Lᵀ
    (block diagonal like A: cheap) the same spectrum is that of ``Lᵀ Σ L``, one eigvalsh and
    no eigendecomposition of Σ (half the time at resnet50's layer4 shortcut, D = 1,280);
    otherwise Σ^½ = V Λ^½ from Σ's eigenvectors (``PIVOT_SPREAD``)."""
    cov = _scatter(gram, affine.bias)[0]  # n·Σ: the correlation does not see the scale
    var = affine.diagonal(cov).clamp_min(0)  # n · diag(A Σ Aᵀ)
    live = live_features(var)
    weights = torch.where(live, 1.0 / var.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    k_mat = affine.gram(weights)
    chol, info = torch.linalg.cholesky_ex(k_mat)
    pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
    if not bool((info != 0).any()) and bool(
        (pivots.amin(dim=-1) > PIVOT_SPREAD * pivots.amax(dim=-1)).all()
    ):
        spectrum = torch.linalg.eigvalsh(chol.transpose(-1, -2) @ cov @ chol)
    else:
        vals, vecs = torch.linalg.eigh(cov)
        root = vecs * vals.clamp_min(0).sqrt()[:, None, :]
        spectrum = torch.linalg.eigvalsh(root.transpose(-1, -2) @ k_mat @ root)
    return live, spectrum
