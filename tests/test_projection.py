"""Pointwise normal equations accumulated on a widening producer's input and mapped through it
(fxkd.projection, NormalEquations.project) are the output's."""

import pytest
import torch
from torch import nn

from fxkd import projection
from fxkd.align import align
from fxkd.lstsq import NormalEquations
from fxkd.passes import InsertAdapters, calibrate
from fxkd.trace import trace

from models import calibrated_resnet_fp64


@pytest.mark.parametrize("bias", [True, False])
def test_projected_sums_are_the_outputs(bias):
    """x = A h + a: sums over h mapped by [[A, a], [0, 1]] equal the sums over x, over several
    updates, and solve to the same weights."""
    gen = torch.Generator().manual_seed(0)
    a_mat = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    a_vec = torch.randn(7, generator=gen, dtype=torch.float64) if bias else torch.zeros(7)
    h = torch.randn(1, 90, 3, generator=gen, dtype=torch.float64) + 2.0
    x = h @ a_mat.T + a_vec
    y = torch.randn(1, 90, 7, generator=gen, dtype=torch.float64)
    on_x, on_h = NormalEquations(1, 7, 7, bias=bias), NormalEquations(1, 3, 7, bias=bias)
    for rows in (slice(0, 40), slice(40, 90)):
        on_x.update(x[:, rows], y[:, rows])
        on_h.update(h[:, rows], y[:, rows])
    mapping = torch.zeros(8, 4, dtype=torch.float64) if bias else a_mat.clone()
    if bias:
        mapping[:7, :3], mapping[:7, 3], mapping[7, 3] = a_mat, a_vec, 1.0
    on_h.project(mapping[None])
    assert on_h.features == 7
    torch.testing.assert_close(on_h.gram, on_x.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(on_h.cross, on_x.cross, rtol=1e-12, atol=1e-9)
    prior = torch.eye(8 if bias else 7, 7, dtype=torch.float64)[None]
    torch.testing.assert_close(on_h.solve(1e-3, prior), on_x.solve(1e-3, prior))
    with pytest.raises(RuntimeError, match="project"):
        on_h.update(h, y)


class _Widening(nn.Module):
    def __init__(self, producer: nn.Module, bn: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.producer = producer
        self.bn = nn.BatchNorm2d(producer.out_channels) if bn else nn.Identity()

    def forward(self, x):
        return torch.relu(self.bn(self.producer(torch.relu(self.stem(x)))))


@pytest.mark.parametrize(
    ("producer", "projected"),
    [
        (nn.Conv2d(16, 64, 1), True),  # a bottleneck's expansion
        (nn.Conv2d(16, 64, 1, stride=2), True),  # a projection shortcut
        (nn.Conv2d(16, 20, 1), False),  # too little wider to pay
        (nn.Conv2d(16, 64, 3, padding=1), False),  # not pointwise: its patches are wider
        (nn.Conv2d(16, 64, 1, groups=2), False),
        (nn.Conv2d(16, 64, 1, padding=1), False),  # padding reads zeros h does not have
    ],
)
def test_which_sites_are_solved_from_their_producers_input(producer, projected):
    model = _Widening(producer).eval()
    x = torch.randn(2, 3, 8, 8)
    t_gm, s_gm = trace(model, x), trace(model, x)
    InsertAdapters(align(t_gm, s_gm), "pointwise")(s_gm)
    found = {
        str(m.module.pair.site.module): m.source
        for ms in calibrate._groups(s_gm).values()
        for m in ms
    }
    source = found["producer"]
    assert (source is not None) == projected
    if projected:  # the stem's relu, what the producer reads
        assert source.op == "call_function" and "relu" in source.name


def test_pointwise_calibration_folds_the_same_student_either_way(monkeypatch):
    """A residual pair whose projection shortcuts widen (joint systems at the adds) in
    pointwise mode, fp64: projected sums give the student the direct sums give. The outputs
    of a widening producer span only its inputs' dimensions, so the ridge decides some
    directions and amplifies the two sums' fp64 rounding (single weights up to 3e-9 apart,
    2e-5 relative, measured): each tensor agrees to 1e-6 norm-wise."""
    runs, original = {}, NormalEquations.project
    for name in ("projected", "direct"):
        if name == "direct":
            monkeypatch.setattr(calibrate, "producer_input", lambda *a: None)
        seen = []

        def recorded(self, m, seen=seen):
            seen.append(m)
            return original(self, m)

        monkeypatch.setattr(NormalEquations, "project", recorded)
        runs[name] = calibrated_resnet_fp64("pointwise", samples=32)
        assert bool(seen) == (name == "projected")
    (projected, e_projected), (direct, e_direct) = runs["projected"], runs["direct"]
    for key, value in direct.items():
        if value.is_floating_point():  # norm-wise: single small weights move relatively more
            assert float((projected[key] - value).norm() / value.norm().clamp_min(1e-12)) < 1e-6
    assert e_projected == pytest.approx(e_direct, rel=1e-6, abs=1e-12)


def test_cost_rule_prefers_the_narrower_side():
    """The input side is taken from about 1.5x widening on (Gram and cross per row)."""
    cost = projection._cost
    assert cost(16, 64) < projection.MAX_COST_SHARE * cost(64, 64)
    assert cost(16, 20) > projection.MAX_COST_SHARE * cost(20, 20)
