"""The cross-validated ridge (ridge="cv", fxkd.solve.crossval): its loss is the held-out error
computed from the sums alone, folds keep a sample's rows together, and a planted student is
still recovered exactly."""

from __future__ import annotations

import pytest
import torch

import fxkd
from fxkd.errors import ConfigError
from fxkd.passes.calibrate import _fold_pieces
from fxkd.solve.crossval import CANDIDATES, FoldedEquations, cross_validated_ridge
from fxkd.solve.normal import NormalEquations
from fxkd.solve.ridge import ridge_solve
from tests.models import make, plant


def test_cross_validated_loss_is_each_folds_held_out_error_up_to_a_constant():
    """For every candidate α: Σ_k ||[X_k 1] W_k(α) − Y_k||² (W_k solved on the other folds
    with the ridge towards a prior) equals the loss from the sums plus Σ||Y||²."""
    g = torch.Generator().manual_seed(0)
    d, k, rows = 6, 3, 40
    x = torch.randn(4, rows, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, k, generator=g, dtype=torch.float64)
    y += 0.5 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    prior = torch.randn(1, d + 1, k, generator=g, dtype=torch.float64)
    systems = FoldedEquations.empty(4, 1, d, k, bias=True, device="cpu")
    for f in range(4):
        systems.fold(f).update(x[f][None], y[f][None])
    sums = [(f.gram, f.cross) for f in systems.folds]
    best, losses = cross_validated_ridge(sums, d, prior)
    assert best in CANDIDATES and losses[CANDIDATES.index(best)] == min(losses)
    ones = torch.ones(rows, 1, dtype=torch.float64)
    for alpha, loss in zip(CANDIDATES, losses, strict=True):
        direct = 0.0
        for f in range(4):
            others = [i for i in range(4) if i != f]
            gram = sum(sums[i][0] for i in others)
            cross = sum(sums[i][1] for i in others)
            w = ridge_solve(gram, cross, d, alpha, prior)[0]
            direct += float(((torch.cat([x[f], ones], 1) @ w - y[f]) ** 2).sum())
        assert direct == pytest.approx(loss + float((y**2).sum()), rel=1e-9)
    # the whole system is the sum of the folds
    whole = NormalEquations(1, d, k, bias=True, device="cpu")
    whole.update(x.reshape(1, -1, d), y.reshape(1, -1, k))
    torch.testing.assert_close(systems.gram, whole.gram)
    torch.testing.assert_close(systems.solve(None, prior), whole.solve(best, prior))


def test_noise_needs_a_larger_ridge_than_a_planted_fit():
    g = torch.Generator().manual_seed(1)
    d, rows = 30, 12  # per fold: 36 training rows for 31 unknowns per output
    x = torch.randn(4, rows, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 2, generator=g, dtype=torch.float64)
    chosen = {}
    for noise in (0.0, 3.0):
        y = x @ w + noise * torch.randn(4, rows, 2, generator=g, dtype=torch.float64)
        eqs = FoldedEquations.empty(4, 1, d, 2, bias=True, device="cpu")
        for f in range(4):
            eqs.fold(f).update(x[f][None], y[f][None])
        chosen[noise] = eqs.choose_ridge()
    assert chosen[0.0] == CANDIDATES[0] and chosen[3.0] > chosen[0.0], chosen


@pytest.mark.parametrize("sizes", [[64, 64, 22], [5], [3, 3, 3, 3]])
def test_fold_pieces_put_every_sample_in_one_contiguous_balanced_fold(sizes):
    total, start, seen = sum(sizes), 0, []
    for n in sizes:
        chunk = torch.zeros(n, 4, 8, 8)
        for fold, sl in _fold_pieces(chunk, start, total, 4):
            seen += [(start + i, fold) for i in range(*sl.indices(n))]
        start += n
    assert [s for s, _ in seen] == list(range(total))  # each sample once, in order
    folds = [f for _, f in seen]
    assert folds == sorted(folds)  # contiguous
    counts = [folds.count(f) for f in range(4)]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
def test_planted_student_is_recovered_with_the_cross_validated_ridge(mode):
    """Noise-free targets: cross-validation takes the smallest ridge, the student is the
    teacher again to 1e-4, and each record names the ridge chosen."""
    teacher, shape = make("vgg")
    student = plant(teacher).double()
    teacher = teacher.double()
    x = torch.randn(96, *shape, dtype=torch.float64)
    result = fxkd.compress(teacher, student, x, num_samples=96, mode=mode, ridge="cv",
                           relax_rounds=0, progress=False)  # fmt: skip
    with torch.no_grad():
        t = teacher(x[:32])
        assert float((result.model(x[:32]) - t).norm() / t.norm()) < 1e-4
    assert {r.ridge for r in result.report.calibrated} <= set(CANDIDATES[:2])


def test_ridge_must_be_a_number_or_cv():
    teacher, shape = make("vgg")
    with pytest.raises(ConfigError, match="'cv'"):
        fxkd.compress(teacher, teacher, torch.randn(8, *shape), ridge="gcv", progress=False)
