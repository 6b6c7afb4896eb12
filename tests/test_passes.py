"""The passes compose in torch.fx's PassManager and give the same model as compress."""

import torch
from torch.fx.passes.infra.pass_manager import PassManager

import fxkd
from fxkd.align import align
from fxkd.passes import CalibrateAdapters, FoldAdapters, InsertAdapters
from fxkd.trace import trace

from models import make, prune_internal_resnet


def test_pass_manager_pipeline_equals_compress():
    teacher, shape = make("resnet")
    student, maps = prune_internal_resnet(teacher)
    samples = torch.randn(96, *shape)
    cfg = fxkd.CompressConfig(num_samples=96, channel_maps=maps, progress=False)
    expected = fxkd.compress(teacher, student, samples, config=cfg).model

    example = samples[:8]
    teacher_gm = trace(teacher, example)
    gm = trace(__import__("copy").deepcopy(student), example)
    alignment = align(teacher_gm, gm, channel_maps=maps)
    manager = PassManager(
        passes=[
            InsertAdapters(alignment, cfg.mode),
            CalibrateAdapters(teacher_gm, samples, cfg),
            FoldAdapters(),
        ],
        run_checks_after_each_pass=True,
    )
    result = manager(gm)
    x = torch.randn(16, *shape)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), expected(x), rtol=1e-5, atol=1e-5)


def test_finite_check_of_the_normal_equations_catches_nan_and_both_infinities():
    from fxkd.passes.calibrate import _finite

    g = torch.randn(2, 5, 5, dtype=torch.float64) * 1e150
    assert _finite(g)
    for bad in (float("nan"), float("inf"), float("-inf")):
        h = g.clone()
        h[1, 2, 3] = bad
        assert not _finite(h)
    h = g.clone()
    h[0, 0, 0], h[1, 1, 1] = float("inf"), float("-inf")  # they would cancel to NaN
    assert not _finite(h)


def test_pointwise_adapter_gemm_path_equals_the_1x1_conv():
    """On a CPU a map with more positions than channels is adapted by one batched GEMM; it
    computes the grouped-1x1-conv definition (fp64, exact to rounding)."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from fxkd.passes.adapter import PointwiseAdapter

    torch.manual_seed(0)
    for shape in [(3, 8, 5, 5), (2, 4, 7), (2, 16, 3, 3)]:  # GEMM, GEMM (1-D), conv (9 < 16)
        x = torch.randn(*shape, dtype=torch.float64)
        c, dims = shape[1], len(shape) - 2
        site = SimpleNamespace(channels=c, groups=1, dims=dims)
        adapter = PointwiseAdapter(SimpleNamespace(site=site), bias=True).double()
        with torch.no_grad():
            adapter.weight.normal_()
            adapter.bias.normal_()
        conv = {1: F.conv1d, 2: F.conv2d}[dims]
        want = conv(x, adapter.weight.reshape(c, c, *[1] * dims), adapter.bias)
        torch.testing.assert_close(adapter(x), want, rtol=1e-12, atol=1e-12)
