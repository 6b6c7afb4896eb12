"""Targets relaxed through a clamp: fit what the next layer sees, not the pre-activation.

A point read only by a clamp-like nonlinearity ``σ(z) = min(max(z, lo), hi)`` (ReLU: lo = 0,
hi = ∞; ReLU6: 0, 6; hardtanh) passes on ``σ(p)``, not the prediction ``p = x W + r`` itself.
Where the teacher's value ``t`` is clamped (``t ≤ lo``), any ``p ≤ lo`` gives the same output, so

    Σ (σ(p) − σ(t))²  ≤  f(W) = Σ_{lo<t<hi} (p − t)²
                              + Σ_{t≤lo} max(p − lo, 0)² + Σ_{t≥hi} min(p − hi, 0)²

and ``f(W) = min over targets y' in the feasible set of Σ (p − y')²``, the set being y' = t inside
the range, y' ≤ lo where t ≤ lo, y' ≥ hi where t ≥ hi. Alternating the two minimisations —
the closest feasible targets for the current prediction (``relaxed_targets``), then the usual
least squares against them — decreases f at every round (majorisation–minimisation): each
round is the same normal equations with new targets. A planted solution (p = t everywhere) is a
fixed point, so exactness is kept.
"""

from __future__ import annotations

import torch

__all__ = ["relaxed_targets"]


def relaxed_targets(
    target: torch.Tensor, prediction: torch.Tensor, lo: float, hi: float
) -> torch.Tensor:
    """The feasible targets closest to ``prediction``: ``target`` inside (lo, hi), else the
    prediction pushed into the clamped region (``min(p, lo)`` where t ≤ lo, ``max(p, hi)``
    where t ≥ hi)."""
    p = prediction.to(target)
    out = torch.where(target <= lo, p.clamp(max=lo), target)
    if hi != float("inf"):
        out = torch.where(target >= hi, p.clamp(min=hi), out)
    return out
