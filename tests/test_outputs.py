"""Models whose output is not one tensor: dicts (torchvision segmentation), NamedTuples, tuples.
compress recovers them, the recovered model returns what the student returned, and the ONNX
check compares every tensor leaf."""

from typing import NamedTuple

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._pytree import tree_flatten

import fxkd
from fxkd.students import prune

from models import plant, randomize_bn


class Heads(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


class MultiOutput(nn.Module):
    """A conv body with two heads, returned as a dict, a NamedTuple or a tuple."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.seg = nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        f = self.body(x)
        logits, seg = self.fc(f.mean((2, 3))), self.seg(f)
        if self.kind == "dict":
            return {"out": seg, "logits": logits}
        if self.kind == "namedtuple":
            return Heads(logits, seg)
        return logits, seg


def _structure(out):
    leaves, spec = tree_flatten(out)
    return spec, [tuple(t.shape) for t in leaves]


@pytest.mark.parametrize("kind", ["dict", "namedtuple", "tuple"])
@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
def test_structured_outputs_compress_and_validate_every_leaf(kind, mode, tmp_path):
    torch.manual_seed(0)
    teacher = randomize_bn(MultiOutput(kind)).eval()
    student = plant(teacher)
    samples = torch.randn(64, 3, 16, 16)
    result = fxkd.compress(teacher, student, samples, mode=mode, ridge=1e-9,
                           onnx=tmp_path / "m.onnx", progress=False)  # fmt: skip
    assert result.onnx.passed and result.onnx.same_size, result.onnx
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        want, got = teacher(x), result.model(x)
    assert _structure(got) == _structure(want)
    for g, w in zip(tree_flatten(got)[0], tree_flatten(want)[0], strict=True):
        assert float((g - w).norm() / w.norm()) < 1e-4  # the planted solution, on every leaf


def _segmentation(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.segmentation.__dict__[name](num_classes=5, weights_backbone=None)
    return randomize_bn(model).eval()


def _check_segmentation(name: str, mode: str, tmp_path) -> None:
    teacher = _segmentation(name)
    samples = torch.randn(8, 3, 64, 64)
    student = prune(teacher, 0.5, importance="l1", example_inputs=samples[:2])
    result = fxkd.compress(teacher, student, samples, num_samples=8, mode=mode,
                           onnx=tmp_path / "seg.onnx", progress=False)  # fmt: skip
    rows = result.report.calibrated
    assert rows and all(r.folded for r in rows)
    for r in rows:
        assert r.err_after <= r.err_before * (1 + 1e-3) + 1e-6, r
    assert result.onnx.passed and result.onnx.same_size, result.onnx
    shapes = {k: v.shape for k, v in result.model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in student.state_dict().items()}
    with torch.no_grad():
        got, want = result.model(samples[:2]), teacher(samples[:2])
    # the same keys and shapes (fx's graph returns a dict where the model built an OrderedDict)
    assert list(got) == list(want)
    assert all(got[k].shape == want[k].shape for k in want)


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
@pytest.mark.parametrize(
    "name", ["fcn_resnet50", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"]
)
def test_torchvision_segmentation_models_compress(name, mode, tmp_path):
    _check_segmentation(name, mode, tmp_path)
