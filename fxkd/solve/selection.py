"""Greedy selection of feature groups by the least-squares energy they explain.

Features come in ``groups`` equal groups (the k² taps of one input channel of a conv, or one
feature of a linear layer); ``G = [x 1]ᵀ[x 1]`` and ``B = [x 1]ᵀ y`` are accumulated normal
equations (``fxkd.solve.normal``). The energy of ``y`` that the features of a set S explain by
least squares (with a bias, so around the means) is

    E(S) = tr(B_Sᵀ G_SS⁻¹ B_S)

Forward selection adds, ``count`` times, the group c with the largest gain

    E(S ∪ c) − E(S) = tr(R_cᵀ H_c⁻¹ R_c),
    H_c = G_cc − G_cS G_SS⁻¹ G_Sc,   R_c = B_c − G_cS G_SS⁻¹ B_S

(the Schur complements of the selected features). Both are kept for every group at once by
eliminating each selected group from the whole system (a rank-``taps`` update of G and B), so a
step costs O(D²·taps), no re-factorisation. The bias column is eliminated first: selection is
on centred features and targets. This is the channel-selection criterion of ThiNet / He et al.
(reconstruct the next layer's output from the kept channels), solved greedily in closed form.
"""

from __future__ import annotations

import torch

__all__ = ["select_groups"]

SELECTION_RIDGE = 1e-6
"""Relative ridge of the selection's systems (numerical safety only: λ = α·mean(diag G))."""


def select_groups(
    gram: torch.Tensor, cross: torch.Tensor, groups: int, count: int, bias: bool = True
) -> list[int]:
    """The ``count`` groups (sorted) chosen greedily by explained energy: ``gram`` (D[+1],
    D[+1]) and ``cross`` (D[+1], K) over D = ``groups``·taps features, group-major (feature f
    in group f // taps), the bias last when ``bias``."""
    if not 0 < count <= groups:
        raise ValueError(f"count={count} must be in 1..{groups}")
    g = gram.to(torch.float64).clone()
    b = cross.to(torch.float64).clone()
    d = g.shape[0] - int(bias)
    if d % groups:
        raise ValueError(f"{d} features do not split into {groups} equal groups")
    taps = d // groups
    if bias:  # centre: eliminate the bias column
        _eliminate(g, b, torch.tensor([d]))
        g, b = g[:d, :d], b[:d]
    lam = SELECTION_RIDGE * g.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    g.diagonal().add_(lam)
    eye = torch.eye(taps, dtype=g.dtype, device=g.device)
    chosen: list[int] = []
    free = torch.ones(groups, dtype=torch.bool, device=g.device)
    for _ in range(count):
        blocks = g.view(groups, taps, groups, taps).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        rhs = b.view(groups, taps, -1)
        sol = torch.linalg.solve(blocks + lam * eye, rhs)
        gains = (rhs * sol).sum(dim=(1, 2))
        gains = torch.where(free & torch.isfinite(gains), gains, -torch.inf)
        c = int(gains.argmax())
        chosen.append(c)
        free[c] = False
        _eliminate(g, b, torch.arange(c * taps, (c + 1) * taps, device=g.device))
    return sorted(chosen)


def _eliminate(g: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> None:
    """In place: G ← G − G[:, i] G_ii⁻¹ G[i, :], B ← B − G[:, i] G_ii⁻¹ B[i] (the system given
    the features ``idx``; their own rows and columns become zero)."""
    gi = g[:, idx]
    gii = gi[idx]
    pinv = torch.linalg.pinv(gii, hermitian=True, rtol=1e-12)
    left = gi @ pinv
    b -= left @ b[idx]
    g -= left @ gi.T
