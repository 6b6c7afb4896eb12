import torch

from fxkd.lstsq import NormalEquations


def _planted(groups=3, d=5, k=4, rows=200, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, rows, d, generator=g, dtype=torch.float64)
    w = torch.randn(groups, d, k, generator=g, dtype=torch.float64)
    c = torch.randn(groups, 1, k, generator=g, dtype=torch.float64)
    y = x @ w + (c if bias else 0)
    return x, y, torch.cat([w, c], dim=1) if bias else w


def test_planted_solution_is_recovered_over_chunks():
    x, y, truth = _planted()
    eqs = NormalEquations(3, 5, 4, bias=True)
    for xs, ys in zip(x.split(37, dim=1), y.split(37, dim=1), strict=True):
        eqs.update(xs, ys)
    assert eqs.rows == 200
    w = eqs.solve(ridge=0.0)
    torch.testing.assert_close(w, truth, rtol=1e-5, atol=1e-5)  # fp32 products per chunk


def test_ridge_shrinks_towards_the_prior_not_zero():
    x, y, truth = _planted(groups=1, d=6, k=2, rows=4, bias=False)  # underdetermined
    prior = torch.randn_like(truth)
    eqs = NormalEquations(1, 6, 2, bias=False)
    eqs.update(x, y)
    huge = eqs.solve(ridge=1e12, prior=prior)
    torch.testing.assert_close(huge, prior, rtol=1e-6, atol=1e-6)
    fit = eqs.solve(ridge=1e-8, prior=prior)
    assert float((x @ fit - y).norm()) < 1e-3 * float(y.norm())  # interpolates the rows


def test_singular_system_falls_back_to_pseudo_inverse():
    x = torch.randn(1, 50, 3, dtype=torch.float64)
    x = torch.cat([x, x[..., :1]], dim=-1)  # a duplicated column: G is singular
    y = x[..., :2] * 2.0
    eqs = NormalEquations(1, 4, 2, bias=False)
    eqs.update(x, y)
    w = eqs.solve(ridge=0.0)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(x @ w, y.float().double(), rtol=1e-4, atol=1e-4)
