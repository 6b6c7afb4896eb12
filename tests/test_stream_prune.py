"""Residual-stream pruning (block outputs) where torch-pruning cannot analyse a model."""

import copy

import torch
from torch import nn

from fxkd.capture import trace
from fxkd.students.streams import find_streams, prune_streams

from models import make


def test_streams_of_a_resnet_are_its_stages():
    """Three stages: the stem (+ first stage's convs) and each projection + second convs
    produce one stream each; the next blocks' first convs, projections and the head read it."""
    teacher, shape = make("resnet")
    streams = find_streams(trace(teacher), torch.randn(2, *shape))
    assert [s.channels for s in streams] == [8, 16, 32]
    last = streams[-1]
    assert "head" in last.readers and len(last.producers) == 3  # projection + two conv2
    assert all(len(s.batchnorms) == len(s.producers) for s in streams)


class _Concat(nn.Module):
    """A residual stream that is also concatenated: it must keep its width."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = y + self.b(torch.relu(y))
        return self.c(torch.cat([y, y], 1))


def test_a_concatenated_stream_keeps_its_width():
    model = _Concat()
    x = torch.randn(2, 3, 8, 8)
    assert find_streams(trace(model), x) == []
    maps, pruned = prune_streams(copy.deepcopy(model), 0.5, x)
    assert maps == {} and pruned == []


def test_pruned_streams_keep_the_teachers_filters_and_run():
    teacher, shape = make("resnet")
    x = torch.randn(4, *shape)
    student = copy.deepcopy(teacher)
    maps, pruned = prune_streams(student, 0.5, x)
    assert len(pruned) == 3
    with torch.no_grad():
        assert student(x).shape == teacher(x).shape
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters()
    )
    t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
    for name, kept in maps.items():  # a kept filter is the teacher's (inputs of kept channels)
        t_w, s_w = t_mods[name].weight, s_mods[name].weight
        assert s_w.shape[0] == len(kept) < t_w.shape[0]
        if s_w.shape[1] == t_w.shape[1]:  # its input is not a pruned stream
            torch.testing.assert_close(s_w, t_w[kept])
    head = s_mods["head"]
    assert head.in_features == len(maps[pruned[-1].producers[0]]) == 16


def test_compress_recovers_a_stream_pruned_student():
    """Block outputs pruned: each add point's adapters (residual branch and shortcut) are
    aligned through the recorded maps, solved and folded; no point gets worse."""
    import fxkd

    teacher, shape = make("resnet")
    x = torch.randn(128, *shape)
    student = copy.deepcopy(teacher)
    maps, _ = prune_streams(student, 0.5, x[:2])
    result = fxkd.compress(teacher, student, x, channel_maps=maps, progress=False)
    rows = result.report.calibrated
    assert rows and all(r.folded for r in rows)
    assert any(r.channels.startswith("8/16") for r in rows)  # a pruned stream, matched
    assert all(r.err_after <= r.err_given + 1e-9 for r in rows)
    assert sum(p.numel() for p in result.model.parameters()) == sum(
        p.numel() for p in student.parameters()
    )


class _Tokens(nn.Module):
    """A Linear over the last dim of a (N, C, L) stream with L == C: it reads positions, not
    channels, so the stream must keep its width."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        y = y + self.b(y)
        return self.fc(y)  # (N, 4, 4): the Linear mixes the 4 positions


def test_a_linear_on_the_last_dim_does_not_read_the_channels():
    model = _Tokens()
    x = torch.randn(2, 3, 4)
    assert find_streams(trace(model), x) == []
    assert prune_streams(copy.deepcopy(model), 0.5, x) == ({}, [])
