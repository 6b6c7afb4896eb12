"""How well the accumulated features determine a least-squares solution.

With the (centred, when there is a bias) second moments ``S`` of the features and their
correlation ``R = D^-1/2 S D^-1/2``, a feature is *dead* when its variance is zero, and the
number of *dependent* features is the number of R's eigenvalues below fp32 precision (its
numerical rank deficiency: the same count whichever order the features come in, and what the
narrow-side diagnosis of ``fxkd.solve.narrow`` reads). One Cholesky of R settles the usual case:
when every pivot (the share of a feature's variance that earlier features do not explain) is
above that precision, no feature is counted dependent and

    cond(R) ≥ 1 / min pivot

(every Schur-complement pivot is at least λ_min(R), and λ_max(R) ≥ 1), a lower bound that costs
one Cholesky instead of an eigendecomposition. A pivot below it (or a failed factorization)
means some eigenvalue is: the eigenvalues below it are then counted by inertia
(``diagnose_correlation``). Counting pivots instead would count a near-duplicate *and* every
feature it then "explains" (x₁ = x₀ + 10⁻⁴x₂ made x₂'s pivot zero: 2 dependent for one null
direction), or not, as the rounding of that zero pivot made the factorization succeed or fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxkd.solve.narrow import BlockAffine, correlation_spectra, live_features

__all__ = [
    "DEPENDENT_PIVOT",
    "ILL_CONDITIONED",
    "Conditioning",
    "count_below",
    "diagnose_correlation",
    "narrow_conditioning",
    "wide_conditioning",
]

DEPENDENT_PIVOT = 1e-7
"""A feature whose unexplained share of variance is below this is numerically dependent (fp32
features carry about 7 significant digits)."""

ILL_CONDITIONED = 1e6
"""Condition bound above which the unridged solution is dominated by fp32 rounding noise."""


@dataclass(frozen=True)
class Conditioning:
    """How well the features determine the solution, summed over the P systems.

    features: P·D; dead: zero-variance features; dependent: the live features' correlation
    eigenvalues below ``DEPENDENT_PIVOT`` (duplicated channels, fewer rows than features);
    rank = features − dead − dependent; condition: a lower bound of the live features'
    correlation condition number (worst system)."""

    features: int
    dead: int
    dependent: int
    condition: float

    @classmethod
    def combine(cls, parts: list[Conditioning]) -> Conditioning:
        """The diagnosis of several systems solved for one point, taken together."""
        return cls(
            sum(c.features for c in parts),
            sum(c.dead for c in parts),
            sum(c.dependent for c in parts),
            max(c.condition for c in parts),
        )

    @property
    def rank(self) -> int:
        return self.features - self.dead - self.dependent

    @property
    def ill(self) -> bool:
        """True when the ridge, not the samples, decides some directions of the solution."""
        return bool(self.dead or self.dependent or self.condition > ILL_CONDITIONED)

    def __str__(self) -> str:
        bound = "singular" if self.condition == float("inf") else f">= {self.condition:.1e}"
        return (
            f"rank {self.rank}/{self.features} ({self.dead} dead, {self.dependent} dependent), "
            f"condition {bound}"
        )


def wide_conditioning(gram: torch.Tensor, features: int, rows: int, bias: bool) -> Conditioning:
    """Dead and dependent features and a condition bound of (P, D[+1], D[+1]) sums ``gram`` =
    ``[x 1]ᵀ[x 1]`` over ``rows`` rows. With fewer (centred) rows than live features a system
    is singular without a factorization: the features past the row count are counted
    dependent (a lower bound)."""
    d, n = features, max(rows, 1)
    second = torch.diagonal(gram[:, :d, :d], dim1=-2, dim2=-1) / n
    mean = gram[:, d, :d] / n if bias else torch.zeros_like(second)
    # centred moments: a constant feature is collinear with the bias
    var = (second - mean * mean).clamp_min(0)
    live = live_features(var)
    dead = int((~live).sum())
    if dead == 0:  # the usual case: every system at once
        systems = [(gram[:, :d, :d], mean, var)]
    else:
        systems = [
            (gram[p][idx[:, None], idx][None], mean[p, idx][None], var[p, idx][None])
            for p, idx in ((p, live[p].nonzero().squeeze(1)) for p in range(len(var)))
            if idx.numel()
        ]
    dependent, condition = 0, 1.0
    most = rows - int(bias)  # the centred rows span at most this many features
    for second_moments, m, v in systems:
        live_here = second_moments.shape[-1]
        if live_here > most:  # fewer rows than features: singular without factorizing
            dependent += second_moments.shape[0] * (live_here - max(most, 0))
            condition = float("inf")
            continue
        below, smallest = diagnose_correlation(correlation(second_moments, m, v, n))
        dependent += below
        condition = max(condition, 1.0 / smallest if smallest > 0 else float("inf"))
    return Conditioning(var.shape[0] * d, dead, dependent, condition)


def narrow_conditioning(gram: torch.Tensor, affine: BlockAffine) -> Conditioning:
    """``wide_conditioning`` of projected sums (features ``x = A h + a``, sums over ``h``) from
    the D×D spectra (``fxkd.solve.narrow``): the live features' correlation has those
    eigenvalues and L − D zeros; dependent: its eigenvalues below ``DEPENDENT_PIVOT``,
    condition: its largest over its smallest (the exact condition number, so again a bound)."""
    live, spectra = correlation_spectra(gram, affine)
    dependent, condition = 0, 1.0
    for count, eig in zip(live.sum(dim=-1).tolist(), spectra, strict=True):
        if not count:  # every feature of this system is dead
            continue
        if count > eig.shape[0]:
            eig = torch.cat([eig.new_zeros(count - eig.shape[0]), eig])
        eig = eig[-count:]  # ascending: the live correlation's whole spectrum
        dependent += int((eig < DEPENDENT_PIVOT).sum())
        smallest = float(eig[0])
        condition = max(condition, float(eig[-1]) / smallest if smallest > 0 else math.inf)
    return Conditioning(live.numel(), int((~live).sum()), dependent, condition)


def correlation(
    second_moments: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, rows: int
) -> torch.Tensor:
    """Correlation matrices ``diag(σ)⁻¹ (G/n − μμᵀ) diag(σ)⁻¹`` of (P, D, D) uncentred sums
    ``G`` over ``n`` rows with means μ and variances σ² (P, D), as one new tensor in three
    passes (no D×D temporaries: these run once per solve on up to 4,608 features)."""
    corr = torch.baddbmm(second_moments, mean[:, :, None], mean[:, None, :], beta=1.0 / rows,
                         alpha=-1.0)  # fmt: skip
    sd = var.rsqrt()
    return corr.mul_(sd[:, :, None]).mul_(sd[:, None, :])


def diagnose_correlation(corr: torch.Tensor) -> tuple[int, float]:
    """(eigenvalues below ``DEPENDENT_PIVOT``, smallest pivot or eigenvalue) of correlation
    matrices (unit diagonal; overwritten). First the pivots ``L_ii²`` of a Cholesky factor (a
    tiny jitter keeps exactly singular matrices factorable; their pivots come out at the
    jitter): when none is below ``DEPENDENT_PIVOT`` neither is any eigenvalue's count to
    report, and the smallest pivot bounds λ_min from above. Otherwise (a pivot below it, or a
    matrix indefinite beyond the jitter from rounding in the centred moments) the count is
    the number of eigenvalues below ``DEPENDENT_PIVOT``, read without an eigensolver: by
    Sylvester's law of inertia it is the number of negative eigenvalues of ``D`` in a Bunch–Kaufman
    ``LDLᵀ = corr − DEPENDENT_PIVOT·I``, where each 2×2 block of ``D`` has exactly one (its
    determinant is negative) and each 1×1 block its sign; the smallest reported is the
    smallest pivot, or 0 (condition ∞) when the factorization failed. Same counts as
    ``eigvalsh`` (tested) and faster on a CPU; on a GPU ``eigvalsh`` stays, cuSOLVER's LDLᵀ
    being the slower there (docs/performance.md)."""
    jitter = corr.shape[-1] * torch.finfo(torch.float64).eps
    diagonal = torch.diagonal(corr, dim1=-2, dim2=-1)
    diagonal += jitter
    chol, info = torch.linalg.cholesky_ex(corr)
    smallest = 0.0
    if not bool((info != 0).any()):
        pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
        smallest = float(pivots.min())
        if smallest >= DEPENDENT_PIVOT:
            return 0, smallest
    diagonal -= jitter
    if corr.device.type == "cuda":  # cuSOLVER's LDLᵀ is slower than its eigvalsh
        eig = torch.linalg.eigvalsh(corr).clamp_min(0)
        return int((eig < DEPENDENT_PIVOT).sum()), float(eig.min())
    return count_below(corr, DEPENDENT_PIVOT), smallest


def count_below(sym: torch.Tensor, tau: float) -> int:
    """How many eigenvalues of the symmetric matrices ``sym`` (overwritten) lie below ``tau``
    (inertia of a Bunch–Kaufman LDLᵀ of ``sym − τI``; LAPACK's pivots: > 0 a 1×1 block, a
    negative pair a 2×2 block)."""
    torch.diagonal(sym, dim1=-2, dim2=-1).sub_(tau)
    ld, pivots, _ = torch.linalg.ldl_factor_ex(sym)
    diag = torch.diagonal(ld, dim1=-2, dim2=-1)
    return int(((pivots > 0) & (diag < 0)).sum() + (pivots < 0).sum() // 2)
