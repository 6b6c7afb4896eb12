import pytest
import torch

from fxkd.align import align
from fxkd.passes import InsertAdapters, KernelAdapter, PointwiseAdapter
from fxkd.trace import trace

from models import ZOO, make


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_identity_insertion_is_a_no_op(name, mode):
    model, shape = make(name)
    x = torch.randn(8, *shape)
    teacher = trace(model, x)
    gm = trace(model, x)
    alignment = align(teacher, gm)
    with torch.no_grad():
        before = model(x)
    result = InsertAdapters(alignment, mode)(gm)
    assert result.modified
    kind = KernelAdapter if mode == "kernel" else PointwiseAdapter
    adapters = [m for m in gm.modules() if isinstance(m, kind)]
    assert len(adapters) == len(alignment.pairs)
    gm.graph.lint()
    with torch.no_grad():
        assert torch.equal(gm(x), before)


def test_depthwise_and_grouped_adapters_keep_group_structure():
    model, shape = make("grouped")
    x = torch.randn(2, *shape)
    gm = trace(model, x)
    InsertAdapters(align(trace(model, x), gm), "pointwise")(gm)
    by_producer = {m.pair.site.producer: m for m in gm.modules() if isinstance(m, PointwiseAdapter)}
    assert by_producer["grouped"].weight.shape == (16, 4)  # 4 groups of 4x4 blocks
    assert by_producer["dw"].weight.shape == (16, 1)  # depthwise: a per-channel scale
    assert by_producer["pw"].weight.shape == (24, 24)
