import math

import pytest
import torch

from fxkd.solve.normal import NormalEquations


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


def _conditioning(x, bias=True):
    eqs = NormalEquations(x.shape[0], x.shape[-1], 2, bias=bias)
    eqs.update(x, torch.randn(*x.shape[:-1], 2))
    return eqs.conditioning(), eqs.solve(ridge=1e-4)


def test_conditioning_of_well_posed_features_is_clean():
    cond, w = _conditioning(torch.randn(2, 400, 12))
    assert (cond.features, cond.dead, cond.dependent, cond.rank) == (24, 0, 0, 24)
    assert not cond.ill and 1.0 <= cond.condition < 10 and torch.isfinite(w).all()


def test_conditioning_counts_dead_and_duplicated_features():
    x = torch.randn(1, 400, 12)
    x[..., 3] = 0.0  # a dead ReLU channel
    x[..., 7] = 5.0  # constant: collinear with the bias column
    x[..., 9] = x[..., 1]  # a duplicated channel
    x[..., 10] = 2 * x[..., 2] - x[..., 4]  # a linear combination
    cond, w = _conditioning(x)
    assert (cond.dead, cond.dependent, cond.rank) == (2, 2, 8)
    assert cond.ill and torch.isfinite(w).all()
    assert "rank 8/12 (2 dead, 2 dependent), condition singular" in str(cond)


def test_conditioning_flags_fewer_rows_than_features():
    cond, w = _conditioning(torch.randn(1, 6, 12))  # 6 rows, centred: rank 5
    assert cond.rank == 5 and cond.ill and torch.isfinite(w).all()


def test_conditioning_bounds_a_near_collinear_pair():
    x = torch.randn(1, 2000, 4, dtype=torch.float64)
    x[..., 1] = x[..., 0] + 5e-4 * x[..., 1]  # unexplained share 2.5e-7: above fp32 noise
    cond, _ = _conditioning(x)
    assert cond.dependent == 0 and 1e6 < cond.condition < 1e8 and cond.ill
    x[..., 1] = x[..., 0] + 1e-4 * x[..., 2]  # share 1e-8: below it, counted as dependent
    cond, _ = _conditioning(x)
    assert cond.dependent == 1 and cond.rank == 3


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_extreme_scales_solve_the_same_problem(scale):
    """The ridge is relative to the Gram's diagonal, so scaling x and y together changes
    neither the solution nor the diagnosis."""
    x, y, _ = _planted(groups=1, d=6, k=3, rows=300)
    x, y = x.float(), (y + 0.1 * torch.randn_like(y)).float()
    ref = NormalEquations(1, 6, 3, bias=True)
    ref.update(x, y)
    big = NormalEquations(1, 6, 3, bias=True)
    big.update(x * scale, y * scale)
    w_ref, w = ref.solve(1e-4), big.solve(1e-4)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[:, :6], w_ref[:, :6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w[:, 6:] / scale, w_ref[:, 6:], rtol=1e-4, atol=1e-4)
    assert big.conditioning().rank == ref.conditioning().rank == 6


def test_eigenvalues_below_a_threshold_are_counted_without_an_eigensolver():
    """The inertia of a Bunch–Kaufman LDLᵀ of S − τI counts S's eigenvalues below τ: the same
    count as eigvalsh on rank-deficient correlation matrices with rounding-size noise (which
    makes them indefinite: the case the Cholesky diagnosis cannot factor)."""
    from fxkd.solve.conditioning import DEPENDENT_PIVOT, count_below, diagnose_correlation

    g = torch.Generator().manual_seed(0)
    indefinite = 0
    for n, rank in [(5, 2), (40, 40), (64, 17), (130, 129), (200, 60), (257, 1)]:
        a = torch.randn(2, n, rank, dtype=torch.float64, generator=g)
        noise = torch.randn(2, n, n, dtype=torch.float64, generator=g) * 1e-6
        s = a @ a.transpose(-1, -2) / rank + (noise + noise.transpose(-1, -2)) / 2
        d = torch.diagonal(s, dim1=-2, dim2=-1).rsqrt()
        corr = s * d[..., :, None] * d[..., None, :]
        eig = torch.linalg.eigvalsh(corr)
        want = int((eig.clamp_min(0) < DEPENDENT_PIVOT).sum())
        assert count_below(corr.clone(), DEPENDENT_PIVOT) == want  # both overwrite their input
        assert diagnose_correlation(corr.clone())[0] == want
        for tau in (1e-3, 0.5, 2.0):
            assert count_below(corr.clone(), tau) == int((eig < tau).sum())
        indefinite += bool((eig.amin(-1) < 0).any())
    assert indefinite >= 3  # the fallback was exercised, not only the Cholesky path


def test_dependent_counts_null_directions_not_small_pivots():
    """A near-duplicate (x₁ = x₀ + a·x₂ + b·x₃, x₃ not a feature) leaves one direction below
    fp32 precision but, in the order x₀, x₁, x₂, two small Cholesky pivots above rounding
    (x₁ given x₀: a² = 9e-8; x₂ given both: b²/a² = 5e-8, to about 1e-8 from rounding). The
    count is the eigenvalues', whichever order the features come in and whether the
    factorization succeeds or not: on one CPU the exactly dependent version of this (b = 0)
    made it succeed and count 2, on another fail and count 1."""
    from fxkd.solve.conditioning import DEPENDENT_PIVOT, diagnose_correlation

    g = torch.Generator().manual_seed(3)
    z = torch.randn(4000, 5, dtype=torch.float64, generator=g)
    z = torch.linalg.qr(z - z.mean(0)).Q  # centred, exactly uncorrelated
    a, b = 9e-8**0.5, (9e-8 * 5e-8) ** 0.5
    x1 = z[:, 0] + a * z[:, 1] + b * z[:, 3]
    features = torch.stack([z[:, 0], x1, z[:, 1], z[:, 2], z[:, 4]], dim=1)
    for order in ([0, 1, 2, 3, 4], [0, 2, 1, 3, 4], [1, 2, 0, 4, 3], [4, 2, 1, 0, 3]):
        corr = torch.corrcoef(features[:, order].T)[None]
        assert int((torch.linalg.eigvalsh(corr) < DEPENDENT_PIVOT).sum()) == 1
        assert diagnose_correlation(corr.clone())[0] == 1
    corr = torch.corrcoef(features.T)[None]
    chol, info = torch.linalg.cholesky_ex(corr)
    pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
    assert int(info) == 0 and int((pivots < DEPENDENT_PIVOT).sum()) == 2 and pivots.min() > 1e-8
    below, smallest = diagnose_correlation(
        corr.clone()
    )  # the factorization succeeds here: its route
    assert below == 1 and 1e-8 < smallest < DEPENDENT_PIVOT  # the condition bound: a pivot


@pytest.mark.cuda
def test_eigenvalue_count_on_the_gpu_equals_the_cpus():
    """cuSOLVER's LDLᵀ (sytrf) follows LAPACK's pivot convention: the same inertia."""
    from fxkd.solve.conditioning import DEPENDENT_PIVOT, count_below

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 300, 90, dtype=torch.float64, generator=g)
    noise = torch.randn(3, 300, 300, dtype=torch.float64, generator=g) * 1e-6
    s = a @ a.transpose(-1, -2) / 90 + (noise + noise.transpose(-1, -2)) / 2
    d = torch.diagonal(s, dim1=-2, dim2=-1).rsqrt()
    corr = s * d[..., :, None] * d[..., None, :]
    want = int((torch.linalg.eigvalsh(corr).clamp_min(0) < DEPENDENT_PIVOT).sum())
    on_gpu = count_below(corr.cuda(), DEPENDENT_PIVOT)
    assert on_gpu == count_below(corr.clone(), DEPENDENT_PIVOT) == want


_CONVS = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}


@pytest.mark.parametrize(
    "conv",
    [
        {"dims": 2, "kernel_size": 3, "padding": 1},
        {"dims": 2, "kernel_size": 3, "padding": 0, "stride": 2},
        {"dims": 2, "kernel_size": (3, 5), "padding": (2, 1), "dilation": (2, 1)},
        {"dims": 2, "kernel_size": 4, "padding": "same"},  # asymmetric padding
        {"dims": 2, "kernel_size": 3, "padding": 1, "groups": 2},
        {"dims": 2, "kernel_size": 3, "padding": 1, "groups": 6},  # depthwise
        {"dims": 2, "kernel_size": 1},
        {"dims": 1, "kernel_size": 5, "padding": 2, "stride": 2},
        {"dims": 3, "kernel_size": 3, "padding": 1},
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_centred_patches_accumulate_the_same_normal_equations(conv, bias):
    """update_patches (patches of x − μ_c in GEMM layout plus the mask algebra) sums the same
    Gram and cross products as update_blocks on F.unfold's patches, in fp64, over several
    updates, for strides, dilations, asymmetric padding, groups and 1-3 spatial dims; the
    features' large means (ReLU of shifted data) make the shift terms matter."""
    from fxkd.solve.patches import patch_blocks

    conv = dict(conv)
    dims = conv.pop("dims")
    module = _CONVS[dims](6, 4 if conv.get("groups", 1) < 6 else 6, **conv).double()
    g = module.groups
    k = module.out_channels // g
    d = (6 // g) * math.prod(module.kernel_size)
    blocks, patches = (NormalEquations(g, d, k, bias=bias) for _ in range(2))
    gen = torch.Generator().manual_seed(1)
    for n in (3, 2, 4):
        x = (torch.randn(n, 6, *[7] * dims, generator=gen, dtype=torch.float64) + 2).relu()
        with torch.no_grad():
            y = module(x) + 0.1 * torch.randn(module(x).shape, generator=gen, dtype=torch.float64)
        y = y.reshape(n, g, k, -1)
        blocks.update_blocks(patch_blocks(x, module), y)
        patches.update_patches(x, module, y)
    assert patches.rows == blocks.rows
    torch.testing.assert_close(patches.gram, blocks.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(patches.cross, blocks.cross, rtol=1e-12, atol=1e-9)


def test_reading_the_sums_midway_does_not_change_them():
    """gram/cross are assembled from the running sums when read; reading them between updates
    (or all_reduce without a process group) must not lose or double any term."""
    x, y, _ = _planted(groups=2, d=4, k=3, rows=90)
    whole, midway = NormalEquations(2, 4, 3, bias=True), NormalEquations(2, 4, 3, bias=True)
    whole.update(x + 5.0, y)
    for xs, ys in zip((x + 5.0).split(30, dim=1), y.split(30, dim=1), strict=True):
        midway.update(xs, ys)
        _ = midway.gram, midway.cross
        midway.all_reduce()
    torch.testing.assert_close(midway.gram, whole.gram, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(midway.cross, whole.cross, rtol=1e-10, atol=1e-8)
    assert midway.rows == whole.rows == 90


@pytest.mark.parametrize("route", ["im2col", "displaced"])
def test_fp32_patches_keep_the_spread_not_the_mean(route, monkeypatch):
    """fp32 features with a mean 300 times their spread: the centred second moments from
    update_patches are as accurate as update_blocks' (rounding scales with the spread), by
    either of its routes (im2col patches, or displaced products of the input)."""
    from fxkd.solve import normal as lstsq
    from fxkd.solve.displaced import displaced_products_fit
    from fxkd.solve.patches import patch_blocks

    rule = displaced_products_fit if route == "displaced" else (lambda m, x: False)
    monkeypatch.setattr(lstsq, "displaced_products_pay", rule)

    module = torch.nn.Conv2d(8, 8, 3, padding=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 8, 12, 12, generator=gen) + 300.0
    y = torch.randn(16, 1, 8, 144, generator=gen) + 50.0
    exact = NormalEquations(1, 72, 8, bias=True)
    exact.update_blocks(patch_blocks(x.double(), module), y.double())

    def centred(eqs):
        d, n = 72, eqs.rows
        mean = eqs.gram[:, d:, :d] / n
        return eqs.gram[:, :d, :d] / n - mean.transpose(-1, -2) @ mean

    errors = {}
    for name in ("blocks", "patches"):
        eqs = NormalEquations(1, 72, 8, bias=True)
        for xs, ys in zip(x.split(4), y.split(4), strict=True):
            if name == "blocks":
                eqs.update_blocks(patch_blocks(xs, module), ys)
            else:
                eqs.update_patches(xs, module, ys)
        errors[name] = float((centred(eqs) - centred(exact)).norm() / centred(exact).norm())
    assert eqs.route == ("displaced" if route == "displaced" else "patches")  # the route under test
    assert errors["patches"] < 1e-5, errors
    assert errors["patches"] < 3 * errors["blocks"] + 1e-7, errors


@pytest.mark.parametrize("features", [127, 128, 301])
def test_gram_panels_fill_the_symmetric_half(features):
    """From SYMMETRIC_PANELS_FROM features on, the Gram product is taken by row panels against
    the features before each panel's end; the skipped upper triangle is filled from the lower
    one: the result is xᵀx (and the cross, bias row and column) exactly, in fp64."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 400, features, generator=gen, dtype=torch.float64) + 1.0
    y = torch.randn(2, 400, 3, generator=gen, dtype=torch.float64)
    eqs = NormalEquations(2, features, 3, bias=True)
    for xs, ys in zip(x.split(150, dim=1), y.split(150, dim=1), strict=True):
        eqs.update(xs, ys)
    ones = torch.ones(2, 400, 1, dtype=torch.float64)
    xa = torch.cat([x, ones], dim=-1)
    torch.testing.assert_close(eqs.gram, xa.transpose(1, 2) @ xa, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(eqs.cross, xa.transpose(1, 2) @ y, rtol=1e-12, atol=1e-9)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("features", [4, 8, 11])
def test_small_systems_sum_accurately_over_long_row_streams(features):
    """fp32 ReLU features, 2^17 rows in one update: the sums are within 1e-6 of fp64 ones. CPU
    BLAS summed such narrow fp32 products in one long chain (2e-5 off at 8 features with MKL,
    3e-7 from 12 features up), so systems under CentredProducts.SMALL_FEATURES sum chains
    of CHAIN rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1 << 17, features, generator=g).relu()
    y = torch.randn(1, 1 << 17, 3, generator=g) + x[..., :1]
    eqs, ref = (NormalEquations(1, features, 3, bias=True) for _ in range(2))
    eqs.update(x, y)
    ref.update(x.double(), y.double())
    assert _rel(eqs.gram, ref.gram) < 1e-6 and _rel(eqs.cross, ref.cross) < 1e-6


def test_a_one_channel_stem_sums_its_nine_patch_features_accurately():
    """A 1-channel 3×3 conv's patches have 9 features (a Fashion-MNIST stem): as accurate as
    the 12-feature system of a 3×2×2 kernel next to it, on the same 128×32×32 inputs."""
    g = torch.Generator().manual_seed(0)
    errors = {}
    for channels, kernel in ((1, 3), (3, 2)):
        conv = torch.nn.Conv2d(channels, 4, kernel, padding=1, bias=False)
        x = torch.randn(128, channels, 32, 32, generator=g).relu()
        with torch.no_grad():
            y = conv(x)
        y = y.reshape(128, 1, 4, -1)
        eqs, ref = (NormalEquations(1, channels * kernel**2, 4, bias=True) for _ in range(2))
        eqs.update_patches(x, conv, y)
        ref.update_patches(x.double(), conv.double(), y.double())
        errors[channels] = _rel(eqs.gram, ref.gram)
    assert errors[1] < 1e-6 and errors[3] < 1e-6, errors


@pytest.mark.parametrize("route", ["rows", "im2col", "displaced", "projected"])
def test_a_retargeted_system_equals_a_fresh_one_on_the_new_targets(route, monkeypatch):
    """``retargeted`` takes only the cross products against new targets and reuses the Gram:
    over the same rows (chunked differently) its sums and solution equal a fresh system's on
    those targets, in fp64, for every route (rows, im2col patches, displaced products, and a
    system projected afterwards), and the source system is left as it was."""
    from fxkd.solve import normal as lstsq
    from fxkd.solve.displaced import displaced_products_fit
    from fxkd.solve.patches import patch_blocks

    rule = displaced_products_fit if route == "displaced" else (lambda m, x: False)
    monkeypatch.setattr(lstsq, "displaced_products_pay", rule)
    gen = torch.Generator().manual_seed(3)
    module = torch.nn.Conv2d(8, 6, 3, padding=1).double()
    x = (torch.randn(12, 8, 9, 9, generator=gen, dtype=torch.float64) + 1.5).relu()
    y1, y2 = (torch.randn(12, 1, 6, 81, generator=gen, dtype=torch.float64) + 2 for _ in "ab")

    def accumulate(eqs, y, chunk):
        for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
            if route in ("rows", "projected"):
                eqs.update_blocks(patch_blocks(xs, module), ys)
            else:
                eqs.update_patches(xs, module, ys)
        return eqs

    source = accumulate(NormalEquations(1, 72, 6, bias=True), y1, 4)
    fresh = accumulate(NormalEquations(1, 72, 6, bias=True), y2, 4)
    before = (source.gram.clone(), source.cross.clone())
    mapping = torch.randn(1, 73, 73, generator=gen, dtype=torch.float64)
    mapping[:, -1] = 0
    mapping[:, -1, -1] = 1
    if route == "projected":
        source.project(mapping)
        fresh.project(mapping)
    retargeted = accumulate(source.retargeted(), y2, 3)
    if route == "projected":
        retargeted.project(mapping)
    assert retargeted.route == fresh.route
    torch.testing.assert_close(retargeted.gram, fresh.gram, rtol=1e-12, atol=1e-8)
    torch.testing.assert_close(retargeted.cross, fresh.cross, rtol=1e-12, atol=1e-8)
    torch.testing.assert_close(retargeted.solve(1e-3), fresh.solve(1e-3), rtol=1e-9, atol=1e-9)
    if route != "projected":
        torch.testing.assert_close(source.gram, before[0], rtol=0, atol=0)
        torch.testing.assert_close(source.cross, before[1], rtol=0, atol=0)
