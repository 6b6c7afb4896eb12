import pytest
import torch

from fxkd.align import align
from fxkd.capture import trace
from fxkd.passes import InsertAdapters, KernelAdapter, PointwiseAdapter

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


@pytest.mark.parametrize(
    ("dims", "channels", "groups", "spatial"),
    [
        (2, 16, 1, 8),  # GEMM path: more positions than channels per group
        (2, 16, 4, 8),  # grouped
        (2, 16, 16, 8),  # depthwise: a per-channel scale
        (2, 64, 1, 3),  # 9 positions < 64 channels: the 1x1 conv path
        (1, 8, 2, 5),
        (3, 8, 1, 3),
    ],
)
def test_pointwise_adapter_is_its_grouped_1x1_conv(dims, channels, groups, spatial):
    """Whatever op computes it (batched GEMM, scale or oneDNN conv), a PointwiseAdapter with
    weight W (C, C/G) and bias c is the grouped 1x1 conv with that kernel, in fp64."""
    from types import SimpleNamespace

    site = SimpleNamespace(channels=channels, groups=groups, dims=dims)
    adapter = PointwiseAdapter(SimpleNamespace(site=site), bias=True).double()
    with torch.no_grad():
        adapter.weight.normal_()
        adapter.bias.normal_()
    x = torch.randn(3, channels, *([spatial] * dims), dtype=torch.float64)
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)
    kernel = adapter.weight.reshape(*adapter.weight.shape, *([1] * dims))
    expected = conv[dims - 1](x, kernel, adapter.bias, groups=groups)
    out = adapter(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.sum().backward()  # still differentiable, like the conv it replaces
    traced = torch.fx.symbolic_trace(adapter)  # a traced graph gets the plain grouped conv
    assert any(n.target is conv[dims - 1] for n in traced.graph.nodes)
    torch.testing.assert_close(traced(x), expected, rtol=1e-12, atol=1e-12)
    assert adapter.weight.grad is not None and adapter.bias.grad is not None
