"""Internal conv-chain pruning (fxkd.students.chains), prune(scope="internal")."""

import pytest
import torch
from torch import nn

import fxkd
from fxkd.capture import trace
from fxkd.students import channel_maps_of, prune
from fxkd.students.chains import find_chains, prune_chains

from models import randomize_bn


class ShuffleBlock(nn.Module):
    """conv1x1 → BN → ReLU → depthwise 3x3 → BN → conv1x1 on one half, concatenated with the
    other half and channel-shuffled (ShuffleNet v2's unit): the shuffle couples the outputs,
    the branch's middle channels are internal."""

    def __init__(self, c: int = 16, mid: int = 12) -> None:
        super().__init__()
        h = c // 2
        self.a = nn.Conv2d(h, mid, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(mid)
        self.dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.dw_bn = nn.BatchNorm2d(mid)
        self.c = nn.Conv2d(mid, h, 1)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y = self.c(self.dw_bn(self.dw(torch.relu(self.a_bn(self.a(x2))))))
        out = torch.cat([x1, y], dim=1)
        n, c, hh, w = out.shape
        return out.view(n, 2, c // 2, hh, w).transpose(1, 2).reshape(n, c, hh, w)


class GroupedBottleneck(nn.Module):
    """RegNet's unit: 1x1 → grouped 3x3 (group width 4) → 1x1, residual add."""

    def __init__(self, c: int = 16, w: int = 16, group_width: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, w, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(w)
        self.b = nn.Conv2d(w, w, 3, padding=1, groups=w // group_width, bias=False)
        self.b_bn = nn.BatchNorm2d(w)
        self.c = nn.Conv2d(w, c, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.b_bn(self.b(torch.relu(self.a_bn(self.a(x))))))
        return torch.relu(x + self.c_bn(self.c(y)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.shuffle = ShuffleBlock()
        self.bottleneck = GroupedBottleneck()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.bottleneck(self.shuffle(torch.relu(self.stem(x))))
        return self.head(y.mean(dim=(2, 3)))


def _net():
    torch.manual_seed(0)
    return randomize_bn(Net())


def test_chains_are_the_internal_channels_only():
    chains = {(c.producer, c.depthwise, c.consumer) for c in find_chains(trace(_net()))}
    assert chains == {
        ("shuffle.a", "shuffle.dw", "shuffle.c"),
        ("bottleneck.a", None, "bottleneck.b"),
        ("bottleneck.b", None, "bottleneck.c"),
    }


def test_prune_chains_keeps_group_counts_block_outputs_and_the_kept_filters():
    teacher = _net()
    student = prune(teacher, 0.5, example_inputs=torch.randn(2, 3, 8, 8), scope="internal")
    maps = channel_maps_of(student)
    assert set(maps) == {"shuffle.a", "shuffle.dw", "bottleneck.a", "bottleneck.b"}
    assert len(maps["shuffle.a"]) == 6 and maps["shuffle.dw"] == maps["shuffle.a"]
    s, t = student.bottleneck, teacher.bottleneck
    assert s.b.groups == t.b.groups == 4 and s.b.in_channels == s.b.out_channels == 8
    # equal numbers removed from every group (group width 4 -> 2)
    for kept in (maps["bottleneck.a"], maps["bottleneck.b"]):
        assert [sum(1 for k in kept if k // 4 == g) for g in range(4)] == [2, 2, 2, 2]
    # block outputs and the head keep their width; kept filters are the teacher's rows
    assert student.shuffle.c.out_channels == 8 and s.c.out_channels == 16
    torch.testing.assert_close(
        student.shuffle.a.weight, teacher.shuffle.a.weight[maps["shuffle.a"]]
    )
    # a pruned producer fed as in the teacher gives its values at the kept channels
    x = torch.randn(4, 3, 8, 8)
    got, want = {}, {}
    student.shuffle.a_bn.register_forward_hook(lambda m, i, o: got.setdefault("v", o))
    teacher.shuffle.a_bn.register_forward_hook(lambda m, i, o: want.setdefault("v", o))
    with torch.no_grad():
        student(x), teacher(x)
    torch.testing.assert_close(got["v"], want["v"][:, maps["shuffle.a"]])


def test_internally_pruned_student_compresses_with_the_builder_maps():
    teacher = _net()
    student = prune(teacher, 0.5, example_inputs=torch.randn(2, 3, 8, 8), scope="internal")
    result = fxkd.compress(teacher, student, torch.randn(128, 3, 8, 8), progress=False)
    rows = result.report.calibrated
    assert rows and all(r.folded for r in rows)
    assert all(r.err_after <= r.err_before * 1.001 + 1e-7 for r in rows), str(result.report)
    assert "builder" in str(result.report)


def test_ratio_zero_and_no_chain():
    teacher = _net()
    assert prune_chains(teacher, 0.0) == {}
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    plain(torch.randn(1, 3, 5, 5))
    with pytest.raises(fxkd.ConfigError, match="no internal conv chain"):
        prune(plain, 0.5, example_inputs=torch.randn(1, 3, 5, 5), scope="internal")


def test_scope_is_validated():
    with pytest.raises(fxkd.ConfigError, match="scope"):
        prune(_net(), 0.5, example_inputs=torch.randn(1, 3, 8, 8), scope="everything")
