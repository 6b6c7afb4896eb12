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
