import pytest
import torch
from torch import nn

from fxkd.capture import eval_mode, node_shape, trace
from fxkd.errors import FxkdError, TraceError

from models import make


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return self.conv(x)
        return -self.conv(x)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.inner(x)))


def test_trace_records_shapes():
    model, shape = make("vgg")
    gm = trace(model, torch.randn(2, *shape))
    shapes = {n.name: node_shape(n) for n in gm.graph.nodes}
    assert shapes["features_0"] == (2, 8, 16, 16)
    assert shapes["head"] == (2, 10)


def test_untraceable_raises_trace_error_with_hint():
    with pytest.raises(TraceError, match="leaf_modules") as info:
        trace(Wrapper(), torch.randn(1, 3, 8, 8))
    assert isinstance(info.value, FxkdError)
    assert "Wrapper" in str(info.value)


def test_leaf_modules_make_it_traceable():
    gm = trace(Wrapper(), torch.randn(1, 3, 8, 8), leaf_modules=(DataDependent,))
    assert any(n.target == "inner" for n in gm.graph.nodes)


def test_eval_mode_restores_flags():
    model, _ = make("resnet")
    model.train()
    model.blocks[0].bn1.eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model.blocks[0].bn1.training and model.blocks[1].bn1.training
