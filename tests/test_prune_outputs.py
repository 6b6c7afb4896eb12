"""Students built by prune and decouple compute outputs of exactly the teacher's shapes, whatever
produces them: a Linear, a conv classifier (SqueezeNet), a per-pixel class map, conv -> pool ->
flatten; and compress recovers them (no point worse, ONNX validated)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._pytree import tree_flatten

import fxkd
from fxkd.errors import ConfigError
from fxkd.students import decouple, prune
from fxkd.students.common import check_output_shapes, output_producers

from models import randomize_bn


class PixelClassifier(nn.Module):
    """A fully convolutional network: a per-pixel class map at the input's resolution."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        y = self.classifier(self.body(x))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ConvHead(nn.Module):
    """conv -> BN -> ReLU blocks, then a conv head -> global pool -> flatten (no Linear)."""

    def __init__(self, classes: int = 7) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Conv2d(32, classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return torch.flatten(self.pool(self.head(self.body(x))), 1)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("squeezenet"):
        model = getattr(torchvision.models, name)(num_classes=10)
    else:
        model = {"pixel-classifier": PixelClassifier, "conv-head": ConvHead}[name]()
    return randomize_bn(model).eval()


MODELS = ["squeezenet1_0", "squeezenet1_1", "pixel-classifier", "conv-head"]
KINDS = ["l1", "bn", "decouple"]


def _shapes(out):
    return [tuple(t.shape) for t in tree_flatten(out)[0]]


def _student(teacher, kind, x):
    if kind == "decouple":
        return decouple(teacher)
    return prune(teacher, 0.5, importance=kind, example_inputs=x)


def test_output_producers_are_the_layers_the_outputs_come_from():
    x = torch.randn(2, 3, 32, 32)
    assert output_producers(_model("conv-head"), x) == ["head"]
    assert output_producers(_model("pixel-classifier"), x) == ["classifier"]
    assert output_producers(_model("squeezenet1_1"), x) == ["classifier.1"]
    assert output_producers(torchvision.models.resnet18(num_classes=3), x) == ["fc"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_students_keep_every_output_shape(name, kind):
    teacher = _model(name)
    x = torch.randn(2, 3, 64, 64)
    student = _student(teacher, kind, x)
    with torch.no_grad():
        assert _shapes(student(x)) == _shapes(teacher(x))
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    if kind != "decouple":
        assert params(student) < 0.6 * params(teacher)  # the rest was pruned


@pytest.mark.parametrize("kind", ["l1", "decouple"])
@pytest.mark.parametrize("name", MODELS)
def test_compress_recovers_students_of_conv_produced_outputs(name, kind, tmp_path):
    teacher = _model(name)
    samples = torch.randn(32, 3, 64, 64)
    student = _student(teacher, kind, samples[:2])
    result = fxkd.compress(teacher, student, samples, num_samples=32, onnx=tmp_path / "s.onnx",
                           progress=False)  # fmt: skip
    rows = result.report.calibrated
    assert rows and all(r.folded for r in rows)
    for r in rows:
        assert r.err_after <= r.err_before * (1 + 1e-3) + 1e-6, r
    assert result.onnx.passed and result.onnx.same_size, result.onnx
    with torch.no_grad():
        assert _shapes(result.model(samples[:2])) == _shapes(teacher(samples[:2]))


def test_a_student_with_other_output_shapes_is_refused_naming_them():
    teacher = _model("conv-head")
    student = _model("conv-head")
    student.head = nn.Conv2d(32, 3, 1)
    with pytest.raises(ConfigError, match=r"output 0: teacher \(2, 7\), student \(2, 3\)"):
        check_output_shapes(teacher, student, torch.randn(2, 3, 16, 16))
