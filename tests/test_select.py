"""Channel selection (fxkd.passes.select, fxkd.solve.selection): the greedy algebra on a planted
subset, which producers count as internal, and a pruned student that kept the wrong channels
recovered exactly once calibration imitates the channels its consumer reads."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import fxkd
from fxkd.capture import trace
from fxkd.passes.select import internal_links
from fxkd.solve.normal import NormalEquations, layer_equations
from fxkd.solve.selection import select_groups
from tests.models import ResNetStyle, VGGStyle


def _system(x: torch.Tensor, y: torch.Tensor) -> NormalEquations:
    eqs = NormalEquations(1, x.shape[1], y.shape[1], bias=True, device="cpu")
    eqs.update(x[None], y[None])
    return eqs


@pytest.mark.parametrize("taps", [1, 9])
def test_select_groups_finds_the_groups_a_target_is_made_of(taps):
    """y is an affine map of 3 of 10 feature groups (generic features): those 3 explain it all,
    and greedy selection returns exactly them, whatever the others correlate with."""
    g = torch.Generator().manual_seed(0)
    groups, rows = 10, 400
    x = torch.randn(rows, groups * taps, generator=g, dtype=torch.float64)
    x[:, : 2 * taps] += 0.5 * x[:, 4 * taps : 6 * taps]  # correlated groups, not in the answer
    planted = [1, 4, 8]
    cols = torch.cat([torch.arange(c * taps, (c + 1) * taps) for c in planted])
    w = torch.randn(len(cols), 5, generator=g, dtype=torch.float64)
    y = x[:, cols] @ w + 3.0
    eqs = _system(x, y)
    assert select_groups(eqs.gram[0], eqs.cross[0], groups, 3) == planted
    assert select_groups(eqs.gram[0], eqs.cross[0], groups, groups) == list(range(groups))
    with pytest.raises(ValueError, match="count"):
        select_groups(eqs.gram[0], eqs.cross[0], groups, 0)


def test_internal_links_are_producers_read_by_one_consumer_through_per_channel_steps():
    example = torch.randn(2, 3, 16, 16)
    vgg = trace(VGGStyle().eval(), example)
    links = {(link.producer, link.consumer) for link in internal_links(vgg)}
    convs = [n for n, m in VGGStyle().named_modules() if isinstance(m, nn.Conv2d)]
    # every conv but the last reaches the next one (through BN, ReLU and pooling)
    assert links == set(itertools.pairwise(convs))
    # in a ResNet only the first conv of each block is internal; block outputs feed an add
    resnet = ResNetStyle().eval()
    links = internal_links(trace(resnet, example))
    assert links and all(link.producer.endswith("conv1") for link in links)
    assert all(link.consumer.endswith("conv2") for link in links)
    assert all(link.target.endswith("bn2") for link in links)  # compared after its BatchNorm


class _Pair(nn.Module):
    """a (3 -> 8) -> BN -> ReLU -> c (8 -> 6): c is the output."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, hidden, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.c = nn.Conv2d(hidden, 6, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.bn(self.a(x))))


def _teacher_and_wrong_student():
    """A teacher whose consumer reads only channels 1, 3, 5, 7 of a's eight (the others have
    the larger filters), and the student an L1 pruner would build: a keeps 0, 2, 4, 6."""
    torch.manual_seed(0)
    teacher = _Pair().double().eval()
    with torch.no_grad():
        teacher.a.weight[0::2] *= 4.0  # the unread channels have the largest norms
        teacher.c.weight[:, 0::2] = 0.0
        teacher.bn.running_mean.uniform_(-0.2, 0.2)
        teacher.bn.running_var.uniform_(0.5, 1.5)
    kept = [0, 2, 4, 6]
    student = _Pair(hidden=4).double().eval()
    with torch.no_grad():
        student.a.weight.copy_(teacher.a.weight[kept])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(student.bn, name).copy_(getattr(teacher.bn, name)[kept])
        student.c.weight.copy_(teacher.c.weight[:, kept])
        student.c.bias.copy_(teacher.c.bias)
    return teacher, student, {"a": kept}


def test_selection_recovers_a_student_that_kept_the_unread_channels():
    """With the pruner's map the consumer's output cannot be rebuilt (its channels were cut);
    selection re-targets a at the channels c reads, and the recovered student is the teacher
    to 1e-6 (fp64), with every parameter's shape kept. The report names the map's source."""
    teacher, student, maps = _teacher_and_wrong_student()
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    shapes = {n: p.shape for n, p in student.named_parameters()}
    errors = {}
    for select in (False, True):
        result = fxkd.compress(teacher, student, x, num_samples=64, channel_maps=maps,
                               ridge=1e-12, select_channels=select, progress=False)  # fmt: skip
        with torch.no_grad():
            t = teacher(x)
            errors[select] = float((result.model(x) - t).norm() / t.norm())
        assert {n: p.shape for n, p in result.model.named_parameters()} == shapes
    assert errors[True] < 1e-6, errors
    assert errors[False] > 0.3, errors
    pair = next(p for p in result.alignment.pairs if p.site.module == "a")
    assert pair.channel_map == (1, 3, 5, 7) and pair.map_source == "selected"
    assert "selected" in str(result.report)


def test_selection_leaves_pointwise_mode_and_unpruned_students_alone():
    """Pointwise adapters only mix the channels a computes: their maps stay the pruner's. An
    unpruned student has no map to change."""
    teacher, student, maps = _teacher_and_wrong_student()
    x = torch.randn(32, 3, 8, 8, dtype=torch.float64)
    result = fxkd.compress(teacher, student, x, num_samples=32, channel_maps=maps,
                           mode="pointwise", progress=False)  # fmt: skip
    pair = next(p for p in result.alignment.pairs if p.site.module == "a")
    assert pair.channel_map == (0, 2, 4, 6) and pair.map_source == "given"
    result = fxkd.compress(teacher, teacher, x, num_samples=32, progress=False)
    assert all(p.channel_map is None for p in result.alignment.pairs)


class _Stream(nn.Module):
    """A residual stream s (4 channels, a 1x1 identity of the input), a block a (4 -> 8)
    -> BN -> ReLU -> c (8 -> 4) added back onto s: a -> c is the one internal link, and a reads
    the stream, whose channels selection does not move."""

    def __init__(self, hidden: int = 8, stream: int = 4) -> None:
        super().__init__()
        self.s = nn.Conv2d(4, stream, 1, bias=False)
        self.a = nn.Conv2d(stream, hidden, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.c = nn.Conv2d(hidden, stream, 3, padding=1)

    def forward(self, x):
        s = self.s(x)
        return s + self.c(torch.relu(self.bn(self.a(s))))


def _stream_teacher_and_student():
    """Teacher: a's channels 0-3 read only stream channels 0, 1 and channels 4-7 only 2, 3; c
    reads 4-7 three times as strongly. The student keeps stream channels 0, 1 (so it cannot
    compute a's channels 4-7 at all) and four of a's channels."""
    torch.manual_seed(0)
    teacher = _Stream().double().eval()
    with torch.no_grad():
        teacher.s.weight.copy_(torch.eye(4)[:, :, None, None])
        teacher.a.weight[:4, 2:] = 0.0
        teacher.a.weight[4:, :2] = 0.0
        teacher.c.weight[:, 4:] *= 3.0
    stream, kept = [0, 1], [2, 3, 4, 5]
    student = _Stream(hidden=4, stream=2).double().eval()
    with torch.no_grad():
        student.s.weight.copy_(teacher.s.weight[stream])
        student.a.weight.copy_(teacher.a.weight[kept][:, stream])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(student.bn, name).copy_(getattr(teacher.bn, name)[kept])
        student.c.weight.copy_(teacher.c.weight[stream][:, kept])
        student.c.bias.copy_(teacher.c.bias[stream])
    return teacher, student, {"s": stream, "a": kept, "c": stream}


def test_selection_scores_what_the_student_can_reproduce_from_its_kept_inputs():
    """On the teacher's own values the strong channels 4-7 explain c best, but the student's a
    reads stream channels 0, 1 only and cannot compute them: selection scores a refitted on
    those inputs and picks 0-3, which the student reproduces; the result beats the choice
    made on the teacher's values (the same compress with the map forced to those), whose
    channels the student can only approximate by their (near zero) projection."""
    teacher, student, maps = _stream_teacher_and_student()
    x = torch.randn(128, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    link = next(link for link in internal_links(trace(teacher, x[:2])) if link.producer == "a")
    assert link.consumer == "c" and link.steps == ("bn", "relu")
    with torch.no_grad():  # c's kept outputs on the teacher's own a channels
        source = torch.relu(teacher.bn(teacher.a(teacher.s(x))))
        eqs = layer_equations(teacher.c, [source], [teacher.c(source)])
    naive = select_groups(eqs.gram[0], eqs.cross[0][:, maps["c"]], 8, 4)
    assert set(naive) & {4, 5, 6, 7}, naive  # the teacher's values favour what a cannot make
    errors = {}
    for name, given in (("selected", None), ("naive", naive)):
        kw = {"channel_maps": {**maps, "a": given}, "select_channels": False} if given else {}
        result = fxkd.compress(teacher, student, x, num_samples=128, ridge=1e-12, progress=False,
                               **({"channel_maps": maps} | kw))  # fmt: skip
        with torch.no_grad():  # the student's output is the stream's kept channels
            t = teacher(x)[:, maps["s"]]
            errors[name] = float((result.model(x) - t).norm() / t.norm())
        if name == "selected":
            pair = next(p for p in result.alignment.pairs if p.site.module == "a")
            assert pair.channel_map == (0, 1, 2, 3) and pair.map_source == "selected"
    assert errors["selected"] < errors["naive"], errors
