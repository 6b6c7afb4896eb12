"""The relative ridge of a system chosen by K-fold cross-validation over the samples.

The rows are accumulated in K systems, one per fold of the *samples* (all rows of one sample —
a conv's positions, a sequence's tokens — in one fold: they are not independent, the samples
are). For a candidate α, fold k's held-out squared error follows from the sums alone:

    W_k(α) solves  (G − G_k + λ·I_D) W = B − B_k + λ·W0,   λ = α·mean(diag(G − G_k)[:D])
    err_k(α) = tr(W_kᵀ G_k W_k) − 2·tr(W_kᵀ B_k) + Σ_{rows of k} ||y||²

(``fxkd.solve.ridge``'s solve of the other folds, shrunk towards the prior W0 as every solve
is). The last term does not depend on α, so α* = argmin_α Σ_k err_k(α) needs no target
energies; the whole system is then solved with α*. Cost: K·|candidates| solves of the
(D+1)-sized system besides the one solve, and nothing more over the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fxkd.solve.conditioning import Conditioning, wide_conditioning
from fxkd.solve.normal import NormalEquations
from fxkd.solve.ridge import ridge_solve

__all__ = ["CANDIDATES", "FOLDS", "FoldedEquations", "cross_validated_ridge"]

FOLDS = 4
"""Folds of the samples."""
CANDIDATES = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""Relative ridges tried (``λ = α·mean(diag G)``)."""


def cross_validated_ridge(
    folds: Sequence[tuple[torch.Tensor, torch.Tensor]],
    features: int,
    prior: torch.Tensor | None = None,
    candidates: Sequence[float] = CANDIDATES,
) -> tuple[float, list[float]]:
    """(α*, the summed held-out error of each candidate up to a constant) for the systems
    ``folds`` = [(gram_k, cross_k)] of (P, D[+1], D[+1]) / (P, D[+1], K) sums."""
    gram = sum(g for g, _ in folds)
    cross = sum(b for _, b in folds)
    losses = []
    for alpha in candidates:
        loss = 0.0
        for g_k, b_k in folds:
            w = ridge_solve(gram - g_k, cross - b_k, features, alpha, prior)
            loss += float((w * (g_k @ w)).sum() - 2 * (w * b_k).sum())
        losses.append(loss)
    best = min(range(len(candidates)), key=losses.__getitem__)
    return candidates[best], losses


class FoldedEquations:
    """K ``NormalEquations`` over disjoint folds of the samples, read as their sum. Rows go to
    one fold each (``fold(k).update_…``); ``gram``, ``cross``, ``rows``, ``conditioning`` and
    ``solve`` are the whole system's, and ``choose_ridge`` picks α by cross-validation (kept
    by the ``retargeted`` systems made from this one)."""

    def __init__(self, folds: Sequence[NormalEquations]) -> None:
        self.folds = list(folds)
        self.ridge: float | None = None
        self.losses: list[float] | None = None
        self._sums: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def empty(cls, count: int, partitions: int, features: int, targets: int, **kwargs):
        return cls([NormalEquations(partitions, features, targets, **kwargs) for _ in range(count)])

    def fold(self, k: int) -> NormalEquations:
        self._sums = None
        return self.folds[k]

    def retargeted(self) -> FoldedEquations:
        """Each fold retargeted (``NormalEquations.retargeted``); the chosen ridge carries."""
        out = FoldedEquations([f.retargeted() for f in self.folds])
        out.ridge, out.losses = self.ridge, self.losses
        return out

    def all_reduce(self) -> None:
        for f in self.folds:
            f.all_reduce()
        self._sums = None

    @property
    def bias(self) -> bool:
        return self.folds[0].bias

    @property
    def features(self) -> int:
        return self.folds[0].features

    @property
    def device(self) -> torch.device:
        return self.folds[0].device

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.folds)

    @property
    def route(self) -> str:
        return self.folds[0].route

    def _summed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sums is None:
            self._sums = (sum(f.gram for f in self.folds), sum(f.cross for f in self.folds))
        return self._sums

    @property
    def gram(self) -> torch.Tensor:
        return self._summed()[0]

    @property
    def cross(self) -> torch.Tensor:
        return self._summed()[1]

    def conditioning(self) -> Conditioning:
        return wide_conditioning(self.gram, self.features, self.rows, self.bias)

    def choose_ridge(self, prior: torch.Tensor | None = None) -> float:
        """α* by cross-validation over the folds (once; a retargeted system keeps it)."""
        if self.ridge is None:
            sums = [(f.gram, f.cross) for f in self.folds]
            self.ridge, self.losses = cross_validated_ridge(sums, self.features, prior)
        return self.ridge

    def solve(self, ridge: float | None = None, prior: torch.Tensor | None = None):
        """The whole system's solution with ``ridge``, or with the cross-validated one."""
        alpha = self.choose_ridge(prior) if ridge is None else ridge
        return ridge_solve(self.gram, self.cross, self.features, alpha, prior)
