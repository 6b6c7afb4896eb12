"""The capture layer: symbolic tracing and torch.export give one graph form; what each front-end
cannot capture, and the several-input path (Inputs)."""

import copy

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

import fxkd
from fxkd.capture import capture, captured_with
from fxkd.data import take_inputs
from fxkd.errors import DataError, TraceError
from fxkd.inputs import Inputs, bind_batch

from models import make, plant


def _call_modules(gm: fx.GraphModule) -> list[tuple[str, str]]:
    return [
        (str(n.target), type(gm.get_submodule(str(n.target))).__name__)
        for n in gm.graph.nodes
        if n.op == "call_module"
    ]


def test_export_graph_has_the_traced_graphs_modules_and_computes_the_same():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    exported = capture(model, x[:2], method="export")
    traced = capture(model, x[:2], method="fx")
    assert captured_with(exported) == "export" and captured_with(traced) == "fx"
    affine = {"Conv2d", "BatchNorm2d", "Linear"}
    assert [m for m in _call_modules(exported) if m[1] in affine] == [
        m for m in _call_modules(traced) if m[1] in affine
    ]
    leftover = [n.target for n in exported.graph.nodes if "aten" in str(n.target)]
    assert leftover == []  # every aten op of resnet18 has a torch-level form
    # the lifted modules hold the model's own tensors, and the batch dimension is dynamic
    assert exported.get_submodule("layer1.0.conv1").weight is model.layer1[0].conv1.weight
    with torch.no_grad():
        assert torch.equal(exported(x), model(x))
        assert torch.equal(exported(x[:1]), model(x[:1]))
    exported.train()  # a plain GraphModule: the passes may toggle modes
    exported.eval()


class ShapeBranch(nn.Module):
    """Python control flow on a shape: symbolic tracing cannot follow it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        if x.dim() == 4:  # a Proxy under symbolic tracing: "cannot be used in control flow"
            x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


class ValueBranch(ShapeBranch):
    """Control flow on a tensor's values: neither front-end captures it."""

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        if x.sum() > 0:
            x = self.conv2(x)
        return self.head(x.mean((2, 3)))


def test_auto_falls_back_to_export_and_says_so():
    torch.manual_seed(0)
    teacher = ShapeBranch().eval()
    student = plant(teacher)
    x = torch.randn(64, 3, 8, 8)
    with pytest.raises(TraceError):
        capture(teacher, x[:2], method="fx")
    result = fxkd.compress(teacher, student, x, num_samples=64, ridge=1e-9, progress=False)
    assert result.report.capture == "export"
    assert "export capture" in str(result.report)
    with torch.no_grad():
        held = torch.randn(16, 3, 8, 8)
        err = float((result.model(held) - teacher(held)).norm() / teacher(held).norm())
    assert err < 1e-4


def test_a_model_neither_front_end_captures_names_both():
    model = ValueBranch().eval()
    with pytest.raises(TraceError, match=r"symbolic tracing.*torch\.export"):
        capture(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(TraceError, match=r"symbolic tracing: .*; torch\.export: ") as caught:
        fxkd.compress(model, copy.deepcopy(model), torch.randn(8, 3, 8, 8), num_samples=8)
    assert set(caught.value.attempts) == {"symbolic tracing", "torch.export"}
    assert "control flow" in caught.value.attempts["symbolic tracing"]


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
@pytest.mark.parametrize("name", ["vgg", "resnet", "convnext", "mlp"])
def test_planted_solution_is_recovered_on_the_export_path(name, mode):
    teacher, shape = make(name)
    student = plant(teacher)
    calib, held_out = torch.randn(256, *shape), torch.randn(64, *shape)
    result = fxkd.compress(
        teacher, student, calib, mode=mode, ridge=1e-9, capture="export", progress=False
    )
    assert result.report.capture == "export"
    with torch.no_grad():
        expected, after = teacher(held_out), result.model(held_out)
    assert float((after - expected).norm() / expected.norm()) < 1e-4
    assert all(r.folded for r in result.report.calibrated)
    given = dict(student.named_parameters())
    assert {n: p.shape for n, p in result.model.named_parameters()} == {
        n: given[n].shape for n, _ in result.model.named_parameters()
    }


def test_export_and_fx_paths_agree_on_a_pruned_student():
    teacher, shape = make("resnet")
    student = plant(teacher, scale=0.5)
    x = torch.randn(128, *shape)
    runs = {
        c: fxkd.compress(teacher, student, x, num_samples=128, capture=c, progress=False)
        for c in ("fx", "export")
    }
    errs = [[r.err_after for r in runs[c].report.calibrated] for c in ("fx", "export")]
    assert errs[0] == pytest.approx(errs[1], rel=1e-4, abs=1e-7)


def test_bind_batch_keyword_positional_and_labelled_batches():
    class Two(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    ids, mask = torch.randint(0, 9, (4, 5)), torch.ones(4, 5, dtype=torch.long)
    bound = bind_batch({"input_ids": ids, "attention_mask": mask, "labels": ids[:, 0]}, None, Two())
    assert bound.args == () and set(bound.kwargs) == {"input_ids", "attention_mask"}
    assert bind_batch({"image": ids, "label": ids[:, 0]}).single is ids  # the old rule
    assert bind_batch((ids, ids[:, 0])).single is ids  # (input, label)
    assert bind_batch({"x": ids, "y": mask}, "y").single is mask


def test_take_inputs_keeps_integer_inputs_and_counts_samples():
    class Two(nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids

    loader = [
        {"input_ids": torch.randint(0, 9, (4, 5)), "attention_mask": torch.ones(4, 5).long()}
        for _ in range(3)
    ]
    got = take_inputs(loader, 10, model=Two())
    assert len(got) == 10 and got.kwargs["input_ids"].dtype == torch.int64
    moved = got.to(dtype=torch.float64)
    assert moved.kwargs["input_ids"].dtype == torch.int64  # ids are not cast
    with pytest.raises(DataError, match="different numbers of samples"):
        Inputs((torch.zeros(3, 2), torch.zeros(4, 2)))
    with pytest.raises(DataError, match="disagree"):
        take_inputs([torch.zeros(2, 3), torch.zeros(2, 4)], 4)
