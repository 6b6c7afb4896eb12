"""Pointwise normal equations accumulated on a widening producer's input and mapped through it
(fxkd.solve.projection, NormalEquations.project) are the output's."""

import pytest
import torch
from torch import nn

from fxkd.align import align
from fxkd.capture import trace
from fxkd.passes import InsertAdapters, calibrate
from fxkd.solve import projection
from fxkd.solve.normal import NormalEquations

from models import calibrated_resnet_fp64


@pytest.mark.parametrize("bias", [True, False])
def test_projected_sums_are_the_outputs(bias):
    """x = A h + a: sums over h mapped by [[A, a], [0, 1]] equal the sums over x, over several
    updates, and solve to the same weights."""
    gen = torch.Generator().manual_seed(0)
    a_mat = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    a_vec = torch.randn(7, generator=gen, dtype=torch.float64) if bias else torch.zeros(7)
    h = torch.randn(1, 90, 3, generator=gen, dtype=torch.float64) + 2.0
    x = h @ a_mat.T + a_vec
    y = torch.randn(1, 90, 7, generator=gen, dtype=torch.float64)
    on_x, on_h = NormalEquations(1, 7, 7, bias=bias), NormalEquations(1, 3, 7, bias=bias)
    for rows in (slice(0, 40), slice(40, 90)):
        on_x.update(x[:, rows], y[:, rows])
        on_h.update(h[:, rows], y[:, rows])
    mapping = torch.zeros(8, 4, dtype=torch.float64) if bias else a_mat.clone()
    if bias:
        mapping[:7, :3], mapping[:7, 3], mapping[7, 3] = a_mat, a_vec, 1.0
    on_h.project(mapping[None])
    assert on_h.features == 7
    torch.testing.assert_close(on_h.gram, on_x.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(on_h.cross, on_x.cross, rtol=1e-12, atol=1e-9)
    prior = torch.eye(8 if bias else 7, 7, dtype=torch.float64)[None]
    torch.testing.assert_close(on_h.solve(1e-3, prior), on_x.solve(1e-3, prior))
    with pytest.raises(RuntimeError, match="project"):
        on_h.update(h, y)


def _widened(bias, d_in=5, d_out=12, rows=200, systems=1, seed=0):
    """Features x = A h + a (P systems) with targets, fp64: what a projected site sees."""
    gen = torch.Generator().manual_seed(seed)
    a_mat = torch.randn(systems, d_out, d_in, generator=gen, dtype=torch.float64)
    a_vec = torch.randn(systems, d_out, generator=gen, dtype=torch.float64)
    if not bias:
        a_vec.zero_()
    h = torch.randn(systems, rows, d_in, generator=gen, dtype=torch.float64).abs() + 0.5
    y = torch.randn(systems, rows, 4, generator=gen, dtype=torch.float64)
    return a_mat, a_vec, h, y


def _both_sides(a_mat, a_vec, h, y, bias, tiles=()):
    """(normal equations on x, on h projected by [[A, a], [0, 1]], A's diagonal ``tiles``)."""
    p, d_out, d_in = a_mat.shape
    on_x = NormalEquations(p, d_out, y.shape[-1], bias=bias)
    on_x.update(h @ a_mat.transpose(-1, -2) + a_vec[:, None, :], y)
    on_h = NormalEquations(p, d_in, y.shape[-1], bias=bias)
    on_h.update(h, y)
    mapping = a_mat.clone()
    if bias:
        mapping = torch.zeros(p, d_out + 1, d_in + 1, dtype=torch.float64)
        mapping[:, :d_out, :d_in], mapping[:, :d_out, d_in], mapping[:, d_out, d_in] = (
            a_mat, a_vec, 1.0
        )  # fmt: skip
    on_h.project(mapping, tiles)
    return on_x, on_h


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ridge", [1e-6, 1e-2])
def test_narrow_side_solve_is_the_wide_solve(bias, ridge):
    """The D×D push-through solve (fxkd.solve.narrow) gives the D'×D' system's solution, with a
    prior, several systems; the mapped sums are never formed for it."""
    a_mat, a_vec, h, y = _widened(bias, systems=2)
    on_x, on_h = _both_sides(a_mat, a_vec, h, y, bias)
    gen = torch.Generator().manual_seed(1)
    prior = torch.randn(2, 12 + int(bias), 4, generator=gen, dtype=torch.float64)
    w_narrow = on_h.solve(ridge, prior)
    assert on_h._final is None  # solved without forming M G Mᵀ
    w_wide = on_x.solve(ridge, prior)
    torch.testing.assert_close(w_narrow, w_wide, rtol=1e-8, atol=1e-9)
    x = h @ a_mat.transpose(-1, -2) + a_vec[:, None, :]  # and it is the ridge minimiser:
    fit = x @ w_narrow[:, :12] + (w_narrow[:, 12:] if bias else 0)  # gradient zero
    lam = ridge * (x * x).sum(dim=1).mean(dim=-1)
    grad = x.transpose(-1, -2) @ (fit - y) + lam[:, None, None] * (w_narrow[:, :12] - prior[:, :12])
    assert float(grad.abs().max()) < 1e-8 * float((x.transpose(-1, -2) @ y).abs().max())


@pytest.mark.parametrize("bias", [True, False])
def test_narrow_side_diagnosis_is_the_wide_one(bias):
    """Dead outputs (zero rows of A), a duplicated input channel and the D' − D directions x
    cannot span: the counts equal the wide system's, the condition is singular either way;
    a square, invertible A gives the correlation's exact condition number."""
    a_mat, a_vec, h, y = _widened(bias)
    a_mat[:, 3] = 0.0  # two dead outputs (constant: collinear with the bias)
    a_mat[:, 8] = 0.0
    h[..., 4] = h[..., 1]  # a duplicated input: rank 4 of 5
    on_x, on_h = _both_sides(a_mat, a_vec, h, y, bias)
    narrow, wide = on_h.conditioning(), on_x.conditioning()
    assert (narrow.features, narrow.dead, narrow.dependent) == (12, 2, 6)
    assert (wide.features, wide.dead, wide.dependent) == (12, 2, 6)
    assert narrow.ill and wide.ill and narrow.condition == float("inf")
    a_mat, a_vec, h, y = _widened(bias, d_in=6, d_out=6)
    on_x, on_h = _both_sides(a_mat, a_vec, h, y, bias)
    x = h[0] @ a_mat[0].T + a_vec[0]
    xc = x - x.mean(dim=0) if bias else x
    corr = xc.T @ xc
    corr = corr / torch.outer(corr.diagonal().sqrt(), corr.diagonal().sqrt())
    eig = torch.linalg.eigvalsh(corr)
    narrow, wide = on_h.conditioning(), on_x.conditioning()
    assert narrow.dependent == wide.dependent == 0
    assert narrow.condition == pytest.approx(float(eig[-1] / eig[0]), rel=1e-6)
    assert wide.condition <= narrow.condition * (1 + 1e-9)  # the pivot bound is below it


@pytest.mark.parametrize("shape", [(8, 6), (5, 12)])
def test_both_spectrum_routes_give_the_wide_diagnosis(shape, monkeypatch):
    """The spectrum through K's Cholesky factor and through Σ's eigendecomposition (taken
    when K is singular: 6 outputs from 8 inputs; forced here for 5 → 12) is the live
    correlation's (its nonzero eigenvalues) and counts the wide system's dependent features,
    with a duplicated input."""
    from fxkd.solve import narrow

    d_in, d_out = shape
    a_mat, a_vec, h, y = _widened(True, d_in=d_in, d_out=d_out)
    h[..., 4] = h[..., 1]
    on_x, on_h = _both_sides(a_mat, a_vec, h, y, True)
    x = h[0] @ a_mat[0].T + a_vec[0]
    xc = x - x.mean(dim=0)
    corr = xc.T @ xc
    corr = corr / torch.outer(corr.diagonal().sqrt(), corr.diagonal().sqrt())
    rank = min(d_out, d_in - 1)  # h spans d_in − 1 dimensions
    exact = torch.linalg.eigvalsh(corr)[-rank:]
    wide = on_x.conditioning()
    for spread in (narrow.PIVOT_SPREAD, 2.0):  # 2.0: no K passes, Σ's eigenvectors
        monkeypatch.setattr(narrow, "PIVOT_SPREAD", spread)
        live_mask, spectra = narrow.correlation_spectra(on_h._narrow[1], on_h._narrow[0])
        live, spectrum = int(live_mask[0].sum()), spectra[0]
        torch.testing.assert_close(spectrum[-rank:], exact, rtol=1e-9, atol=1e-9)
        cond = on_h.conditioning()
        assert live == d_out and (cond.dead, cond.dependent) == (wide.dead, wide.dependent)
        assert cond.dependent == d_out - rank


@pytest.mark.parametrize("bias", [True, False])
def test_joint_systems_are_solved_block_by_block(bias):
    """Two members at an add (A block diagonal, 5 → 12 and 3 → 8 features, correlated
    inputs): the block-wise products solve and diagnose the wide system; wrong tiles are
    refused."""
    a_mat, a_vec, h, y = _widened(bias, d_in=8, d_out=20)
    a_mat[:, :12, 5:] = 0.0
    a_mat[:, 12:, :5] = 0.0
    h[..., 6] = 0.5 * h[..., 1] + h[..., 2]  # the second member's input reads the first's
    on_x, on_h = _both_sides(a_mat, a_vec, h, y, bias, tiles=[(12, 5), (8, 3)])
    prior = torch.eye(20 + int(bias), 4, dtype=torch.float64)[None]
    torch.testing.assert_close(
        on_h.solve(1e-4, prior), on_x.solve(1e-4, prior), rtol=1e-8, atol=1e-9
    )
    narrow, wide = on_h.conditioning(), on_x.conditioning()
    assert (narrow.dead, narrow.dependent) == (wide.dead, wide.dependent) == (0, 13)
    with pytest.raises(ValueError, match="tile"):
        _both_sides(a_mat, a_vec, h, y, bias, tiles=[(12, 5), (8, 4)])


@pytest.mark.cuda
def test_narrow_side_on_the_gpu_is_the_cpus_wide_solve():
    """The D×D solve and diagnosis on a CUDA device (fp64, a joint system): the CPU's wide
    solution and counts."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    a_mat, a_vec, h, y = _widened(True, d_in=8, d_out=20)
    a_mat[:, :12, 5:], a_mat[:, 12:, :5] = 0.0, 0.0
    on_x, _ = _both_sides(a_mat, a_vec, h, y, True)
    mapping = torch.zeros(1, 21, 9, dtype=torch.float64)
    mapping[:, :20, :8], mapping[:, :20, 8], mapping[:, 20, 8] = a_mat, a_vec, 1.0
    on_gpu = NormalEquations(1, 8, 4, bias=True, device="cuda")
    on_gpu.update(h.cuda(), y.cuda())
    on_gpu.project(mapping.cuda(), [(12, 5), (8, 3)])
    prior = torch.eye(21, 4, dtype=torch.float64)[None]
    w = on_gpu.solve(1e-4, prior.cuda())
    torch.testing.assert_close(w.cpu(), on_x.solve(1e-4, prior), rtol=1e-8, atol=1e-9)
    assert on_gpu.conditioning().dependent == on_x.conditioning().dependent == 12


def test_narrow_side_solve_with_fewer_rows_than_inputs():
    """Underdetermined (8 rows, 10 inputs, 30 outputs): the ridge decides most directions;
    still the wide system's solution."""
    a_mat, a_vec, h, y = _widened(True, d_in=10, d_out=30, rows=8)
    on_x, on_h = _both_sides(a_mat, a_vec, h, y, True)
    prior = torch.eye(31, 4, dtype=torch.float64)[None]
    torch.testing.assert_close(
        on_h.solve(1e-3, prior), on_x.solve(1e-3, prior), rtol=1e-7, atol=1e-8
    )
    assert on_h.conditioning().rank == on_x.conditioning().rank == 7


class _Widening(nn.Module):
    def __init__(self, producer: nn.Module, bn: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.producer = producer
        self.bn = nn.BatchNorm2d(producer.out_channels) if bn else nn.Identity()

    def forward(self, x):
        return torch.relu(self.bn(self.producer(torch.relu(self.stem(x)))))


@pytest.mark.parametrize(
    ("producer", "projected"),
    [
        (nn.Conv2d(16, 64, 1), True),  # a bottleneck's expansion
        (nn.Conv2d(16, 64, 1, stride=2), True),  # a projection shortcut
        (nn.Conv2d(16, 20, 1), False),  # too little wider to pay
        (nn.Conv2d(16, 64, 3, padding=1), False),  # not pointwise: its patches are wider
        (nn.Conv2d(16, 64, 1, groups=2), False),
        (nn.Conv2d(16, 64, 1, padding=1), False),  # padding reads zeros h does not have
    ],
)
def test_which_sites_are_solved_from_their_producers_input(producer, projected):
    model = _Widening(producer).eval()
    x = torch.randn(2, 3, 8, 8)
    t_gm, s_gm = trace(model, x), trace(model, x)
    InsertAdapters(align(t_gm, s_gm), "pointwise")(s_gm)
    found = {
        str(m.module.pair.site.module): m.source
        for ms in calibrate.adapter_groups(s_gm).values()
        for m in ms
    }
    source = found["producer"]
    assert (source is not None) == projected
    if projected:  # the stem's relu, what the producer reads
        assert source.op == "call_function" and "relu" in source.name


def test_pointwise_calibration_folds_the_same_student_either_way(monkeypatch):
    """A residual pair whose projection shortcuts widen (joint systems at the adds) in
    pointwise mode, fp64: projected sums give the student the direct sums give. The outputs
    of a widening producer span only its inputs' dimensions, so the ridge decides some
    directions and amplifies the two sums' fp64 rounding (single weights up to 3e-9 apart,
    2e-5 relative, measured): each tensor agrees to 1e-6 norm-wise."""
    runs, original = {}, NormalEquations.project
    for name in ("projected", "direct"):
        if name == "direct":
            monkeypatch.setattr(calibrate, "producer_input", lambda *a: None)
        seen = []

        def recorded(self, *args, seen=seen):
            seen.append(args)
            return original(self, *args)

        monkeypatch.setattr(NormalEquations, "project", recorded)
        runs[name] = calibrated_resnet_fp64("pointwise", samples=32)
        assert bool(seen) == (name == "projected")
    (projected, e_projected), (direct, e_direct) = runs["projected"], runs["direct"]
    for key, value in direct.items():
        if value.is_floating_point():  # norm-wise: single small weights move relatively more
            assert float((projected[key] - value).norm() / value.norm().clamp_min(1e-12)) < 1e-6
    assert e_projected == pytest.approx(e_direct, rel=1e-6, abs=1e-12)


def test_cost_rule_prefers_the_narrower_side():
    """The input side is taken from about 1.5x widening on (Gram and cross per row)."""
    cost = projection.update_cost
    assert cost(16, 64) < projection.MAX_COST_SHARE * cost(64, 64)
    assert cost(16, 20) > projection.MAX_COST_SHARE * cost(20, 20)


@pytest.mark.parametrize(("size", "warned"), [(8, False), (4, True)])
def test_too_few_rows_warning_counts_what_samples_can_determine(size, warned, caplog):
    """A projected site's features span its producer's 16 inputs: 64 rows (one 8x8 sample)
    determine all that samples can (17 unknowns with the bias), though the adapter has 65; 16
    rows (4x4) do not, and the hint is more samples (a kernel too large for its rows is already
    solved pointwise, so mode='pointwise' is no remedy)."""
    torch.manual_seed(0)
    teacher = _Widening(nn.Conv2d(16, 64, 1)).eval()
    student = _Widening(nn.Conv2d(16, 64, 1)).eval()
    x = torch.randn(1, 3, size, size)
    t_gm, s_gm = trace(teacher, x), trace(student, x)
    InsertAdapters(align(t_gm, s_gm), "pointwise")(s_gm)
    with caplog.at_level("WARNING", logger="fxkd"):
        calibrate.CalibrateAdapters(t_gm, x)(s_gm)
    producer = [r for r in caplog.records if "fxkd_adapter_1" in r.getMessage()]
    assert bool(producer) == warned
    if warned:
        assert "16 sample rows for 17 unknowns" in producer[0].getMessage()
    assert "mode=" not in caplog.text
