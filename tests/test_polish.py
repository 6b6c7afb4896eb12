"""The optional label-free gradient polish after the closed form."""

import copy

import pytest
import torch

import fxkd
from fxkd.capture import trace
from fxkd.errors import ConfigError
from fxkd.passes.adapter import ADAPTER_TYPES
from fxkd.polish import polish

from models import make, plant, prune_internal_vgg


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_polish_reduces_the_error_and_keeps_the_student_and_its_shapes():
    teacher, shape = make("vgg")
    student = plant(teacher, scale=0.3)
    given = copy.deepcopy(student.state_dict())
    x, held_out = torch.randn(128, *shape), torch.randn(64, *shape)
    points = [("features_5", "features_5"), ("head", "head")]
    nodes = {n.name for n in trace(student).graph.nodes}
    assert {p for p, _ in points} <= nodes
    polished = polish(teacher, student, x, points, steps=60, lr=1e-3, progress=False)
    with torch.no_grad():
        before = _rel(student(held_out), teacher(held_out))
        after = _rel(polished(held_out), teacher(held_out))
    assert after < 0.7 * before, (before, after)
    assert all(torch.equal(given[k], v) for k, v in student.state_dict().items())
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    assert {k: v.shape for k, v in polished.state_dict().items()} == shapes
    assert not polished.training


def test_compress_with_polish_keeps_the_folded_form_and_improves_on_held_out_data():
    """Pruned student: the polish runs after the closed form on the same samples; the result
    has no adapter, the student's parameter count, and a lower held-out error at the logits."""
    teacher, shape = make("vgg")
    student, maps = prune_internal_vgg(teacher, keep=0.5)
    x, held_out = torch.randn(256, *shape), torch.randn(128, *shape)
    kw = {"channel_maps": maps, "progress": False, "mode": "pointwise"}
    closed = fxkd.compress(teacher, student, x, **kw)
    polished = fxkd.compress(teacher, student, x, polish_steps=100, **kw)
    count = sum(p.numel() for p in student.parameters())
    assert sum(p.numel() for p in polished.model.parameters()) == count
    assert not any(isinstance(m, ADAPTER_TYPES) for m in polished.model.modules())
    with torch.no_grad():
        target = teacher(held_out)
        assert _rel(polished.model(held_out), target) < _rel(closed.model(held_out), target)


def test_fxkd_polish_is_the_function_the_readme_calls():
    assert fxkd.polish is polish and callable(fxkd.polish)


def test_polish_with_zero_steps_is_a_copy():
    teacher, shape = make("resnet")
    student = plant(teacher)
    x = torch.randn(32, *shape)
    out = polish(teacher, student, x, [("head", "head")], steps=0, progress=False)
    assert out is not student
    assert all(
        torch.equal(a, b) for a, b in zip(out.parameters(), student.parameters(), strict=True)
    )


def test_polish_callback_sees_every_step_and_its_checkpoint_is_the_shorter_polish():
    """callback(step, model) after each step: a copy taken at step 5 of a 12-step polish equals
    a 5-step polish with the same seed (the same batches, the same updates)."""
    teacher, shape = make("vgg")
    student = plant(teacher, scale=0.3)
    x = torch.randn(96, *shape)
    points = [("features_5", "features_5"), ("head", "head")]
    seen, kept = [], {}

    def callback(step, model):
        seen.append((step, model.training, torch.is_grad_enabled()))
        if step == 5:
            kept["model"] = copy.deepcopy(model)

    kw = {"lr": 1e-3, "batch_size": 32, "seed": 3, "progress": False}
    polish(teacher, student, x, points, steps=12, callback=callback, **kw)
    assert seen == [(k, False, False) for k in range(1, 13)]
    short = polish(teacher, student, x, points, steps=5, **kw)
    for a, b in zip(kept["model"].parameters(), short.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"steps": -1}, "steps"), ({"lr": 0.0}, "lr"), ({"points": [("nope", "head")]}, "nope")],
)
def test_polish_bad_arguments(kwargs, match):
    teacher, shape = make("resnet")
    args = {"points": [("head", "head")], "progress": False, **kwargs}
    with pytest.raises(ConfigError, match=match):
        polish(teacher, plant(teacher), torch.randn(8, *shape), **args)


def test_polish_options_are_validated():
    with pytest.raises(ConfigError, match="polish_steps"):
        fxkd.CompressConfig(polish_steps=-3)
    with pytest.raises(ConfigError, match="polish_lr"):
        fxkd.CompressConfig(polish_lr=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compress_with_polish_on_cuda():
    teacher, shape = make("vgg")
    student, maps = prune_internal_vgg(teacher, keep=0.5)
    teacher, student = teacher.cuda(), student.cuda()
    x, held_out = torch.randn(256, *shape), torch.randn(128, *shape).cuda()
    kw = {"channel_maps": maps, "progress": False, "mode": "pointwise"}
    closed = fxkd.compress(teacher, student, x, **kw)
    polished = fxkd.compress(teacher, student, x, polish_steps=100, **kw)
    assert next(polished.model.parameters()).device.type == "cuda"
    with torch.no_grad():
        target = teacher(held_out)
        assert _rel(polished.model(held_out), target) < _rel(closed.model(held_out), target)
