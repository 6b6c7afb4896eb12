"""The ridge solve of accumulated normal equations, shrunk towards a prior.

    (G + λ·I_D) W = B + λ·W0,   λ = α · mean(diag G[:D, :D])      (no ridge on the bias row)

by Cholesky in fp64 (two triangular solves), falling back to an eigendecomposition
pseudo-inverse for systems Cholesky rejects.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["pinv_solve", "ridge_solve"]

log = logging.getLogger(__name__)


def ridge_solve(
    gram: torch.Tensor,
    cross: torch.Tensor,
    features: int,
    ridge: float,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (P, D[+1], K) solution of ``gram`` (P, D[+1], D[+1]) against ``cross`` (P, D[+1],
    K) with a relative ridge ``α = ridge`` on the first ``features`` rows; ``prior`` (same
    shape as the solution) is what the ridge shrinks towards."""
    g, b, d = gram, cross, features
    diag = torch.diagonal(g[:, :d, :d], dim1=-2, dim2=-1)
    lam = ridge * diag.mean(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    a = g.clone()  # G + λ·I_D: the ridge on the feature diagonal, none on the bias
    torch.diagonal(a, dim1=-2, dim2=-1)[:, :d] += lam[:, None]
    rhs = b
    if prior is not None:  # + λ·I_D W0: the prior's feature rows (an elementwise product,
        shrink = prior.to(b).clone()  # not a D³ product with an identity matrix)
        shrink[:, d:] = 0
        rhs = b + lam[:, None, None] * shrink
    chol, info = torch.linalg.cholesky_ex(a)  # two triangular solves: cholesky_solve
    w = torch.linalg.solve_triangular(chol, rhs, upper=False)  # makes copies of its own
    w = torch.linalg.solve_triangular(chol.mT, w, upper=True)
    bad = (info != 0) | ~torch.isfinite(w).flatten(1).all(dim=1)
    if bad.any():
        log.warning(
            "Cholesky failed for %d of %d systems; using a pseudo-inverse",
            int(bad.sum()),
            len(bad),
        )
        w[bad] = pinv_solve(a[bad], rhs[bad])
    return w


def pinv_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Minimum-norm solution of symmetric PSD systems through eigh, small eigenvalues cut."""
    vals, vecs = torch.linalg.eigh(a)
    cut = vals.amax(dim=-1, keepdim=True) * a.shape[-1] * torch.finfo(a.dtype).eps
    inv = torch.where(vals > cut, 1.0 / vals.clamp_min(torch.finfo(a.dtype).tiny), 0.0)
    return vecs @ (inv[..., None] * (vecs.transpose(-1, -2) @ rhs))
