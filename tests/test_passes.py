"""The passes compose in torch.fx's PassManager and give the same model as compress."""

import torch
from torch.fx.passes.infra.pass_manager import PassManager

import fxkd
from fxkd.align import align
from fxkd.capture import trace
from fxkd.passes import CalibrateAdapters, FoldAdapters, InsertAdapters

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
    from fxkd.passes.calibrate import all_finite

    g = torch.randn(2, 5, 5, dtype=torch.float64) * 1e150
    assert all_finite(g)
    for bad in (float("nan"), float("inf"), float("-inf")):
        h = g.clone()
        h[1, 2, 3] = bad
        assert not all_finite(h)
    h = g.clone()
    h[0, 0, 0], h[1, 1, 1] = float("inf"), float("-inf")  # they would cancel to NaN
    assert not all_finite(h)
