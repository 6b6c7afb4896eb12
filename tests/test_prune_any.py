"""prune on any architecture: a valid student or a clear refusal, in bounded time and memory.
Small models reproduce what failed on real ones: torch-pruning growing without bound (Swin),
a BatchNorm+activation module that symbolic tracing follows into ``F.batch_norm`` (timm's
RegNet-X), transformer MLPs (the fallback's only prunable channels in Swin) and a
partial-channel residual (ReXNet)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxkd
from fxkd.capture import capture, hides_layers
from fxkd.students import TorchPruningError, channel_maps_of, prune
from fxkd.students.budget import BudgetExceeded, analysis_budget
from fxkd.support import check_support

from models import make, randomize_bn


def test_memory_growth_past_the_budget_is_interrupted():
    held = []
    with pytest.raises(BudgetExceeded, match="memory budget"), analysis_budget(None, 64 * 2**20):
        for _ in range(10_000):
            held.append(torch.ones(8 * 2**20 // 4))  # 8 MiB a step
    assert len(held) < 100  # stopped within a few checks of crossing 64 MiB
    held.clear()


def _growing_groups(self, *args, **kwargs):
    """Stands in for torch-pruning's group enumeration where its memory runs away (torchvision's
    swin_t exhausted 24 GiB in it)."""
    hoard = []
    while True:
        hoard.append(torch.ones(4 * 2**20 // 4))
        yield from ()


def test_a_memory_runaway_falls_back_or_refuses_naming_the_budget(monkeypatch, caplog):
    import torch_pruning as tp

    monkeypatch.setattr(tp.DependencyGraph, "get_all_groups", _growing_groups)
    teacher, shape = make("vgg")
    x = torch.randn(2, *shape)
    with pytest.raises(TorchPruningError, match=r"memory budget of 0\.062 GiB"):
        prune(teacher, 0.5, example_inputs=x, scope="all", memory_budget_bytes=64 * 2**20)
    with caplog.at_level(logging.WARNING):
        student = prune(teacher, 0.5, example_inputs=x, memory_budget_bytes=64 * 2**20)
    assert "memory budget" in caplog.text
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters()
    )


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNorm + activation module: a BatchNorm2d subclass that calls F.batch_norm
    itself, so symbolic tracing follows into it and sees no BatchNorm module."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return self.act(x)


class TimmStyle(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for c in (16, 32, 32, 16):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), BatchNormAct2d(c)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_layers_hidden_by_symbolic_tracing_are_captured_by_export():
    teacher = randomize_bn(TimmStyle()).eval()
    x = torch.randn(64, 3, 8, 8)
    assert hides_layers(capture(teacher, x[:2], method="fx"))
    gm = capture(teacher, x[:2])  # auto: export lifts the BatchNorms back to modules
    kinds = [
        type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"
    ]
    assert kinds.count("BatchNorm2d") == 4
    student = prune(teacher, 0.5, example_inputs=x[:2], scope="internal")  # was: no chain
    assert len(channel_maps_of(student)) == 3
    row = check_support(teacher, student, x)
    assert row.capture == "export" and row.ok, row
    assert row.pairs == 5


class MLPBlocks(nn.Module):
    """Transformer MLPs (Linear -> GELU -> Dropout -> Linear) around a residual stream."""

    def __init__(self, width: int = 16, hidden: int = 48):
        super().__init__()
        self.embed = nn.Linear(12, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Linear(width, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, width)
            )
            for _ in range(2)
        )
        self.head = nn.Linear(width, 5)

    def forward(self, x):  # x: (N, tokens, 12)
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.mean(1))


def test_the_fallback_prunes_transformer_mlps_and_compress_recovers_them():
    torch.manual_seed(0)
    teacher = MLPBlocks().eval()
    x = torch.randn(128, 6, 12)
    student = prune(teacher, 0.5, example_inputs=x[:2], scope="internal")
    maps = channel_maps_of(student)
    assert set(maps) == {"blocks.0.0", "blocks.1.0"}
    assert all(
        student.blocks[i][0].out_features == 24 == student.blocks[i][3].in_features for i in (0, 1)
    )
    result = fxkd.compress(teacher, student, x, num_samples=128, progress=False)
    rows = result.report.calibrated
    assert rows and all(r.err_after <= r.err_given + 1e-6 for r in rows)


class PartialResidual(nn.Module):
    """ReXNet's partial-channel residual: a block adds its output to the first channels only."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(32, 24, 1), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.project(self.expand(x))
        y = torch.cat([y[:, :16] + x, y[:, 16:]], dim=1)
        return self.head(y.mean((2, 3)))


def test_a_partial_channel_residual_keeps_its_width_with_a_reason(caplog):
    teacher = randomize_bn(PartialResidual()).eval()
    x = torch.randn(64, 3, 8, 8)
    with caplog.at_level(logging.WARNING):
        student = prune(teacher, 0.5, example_inputs=x[:2])
    # torch-pruning's student fails on the sliced add: refused, fxkd's analysis takes over
    assert "fails on example_inputs" in caplog.text and "fxkd's own" in caplog.text
    assert student.stem[0].out_channels == 16 and student.project[0].out_channels == 24
    assert student.expand[0].out_channels == 16  # the block's internal channels are pruned
    row = check_support(teacher, student, x)
    assert row.ok and not row.worse, row


def test_when_both_analyses_give_up_the_refusal_names_both(monkeypatch):
    import torch_pruning as tp

    def broken(*args, **kwargs):
        raise RuntimeError("an op torch-pruning cannot map")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", broken)
    # one conv whose channels are the output: nothing either analysis may prune
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(
        fxkd.ConfigError, match=r"torch-pruning could not.*then fxkd's own analysis"
    ):
        prune(model, 0.5, example_inputs=torch.randn(2, 3, 8, 8))


def test_a_group_torch_pruning_cannot_score_falls_back(monkeypatch, caplog):
    """GhostNet: a coupled group whose members disagree in width made prune crash with an
    untyped RuntimeError; it is now torch-pruning's failure, and the fallback takes over."""
    from fxkd.students import pruning

    def mismatched(group, kind):
        raise RuntimeError("The size of tensor a (160) must match the size of tensor b (80)")

    monkeypatch.setattr(pruning, "_importance", mismatched)
    teacher, shape = make("vgg")
    x = torch.randn(2, *shape)
    with pytest.raises(TorchPruningError, match="could not be scored"):
        prune(teacher, 0.5, example_inputs=x, scope="all")
    with caplog.at_level(logging.WARNING):
        student = prune(teacher, 0.5, example_inputs=x)
    assert "could not be scored" in caplog.text and "fxkd's own" in caplog.text
    assert student(x).shape == teacher(x).shape
