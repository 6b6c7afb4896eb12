"""Numerical robustness: ill-conditioned features stay finite and are flagged in the report;
the solve never makes a point worse than the student as given beyond the ridge's own term."""

import pytest
import torch
from torch import nn

import fxkd

from models import make, plant


def _ill_student(teacher):
    """The planted student with a dead channel (zeroed filter) and a duplicated one in the
    first conv: its pointwise features have a zero-variance and a dependent column."""
    student = plant(teacher)
    conv, bn = student.features[0], student.features[1]
    with torch.no_grad():
        conv.weight[2] = 0.0
        conv.weight[5] = conv.weight[4]
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[5] = t[4]
    return student


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
def test_dead_and_duplicated_channels_are_flagged_and_solved(mode):
    """Pointwise mode solves on the first site's outputs (1 dead + 1 duplicated of 8); kernel
    mode on its input patches, damaged too: input channel 2 is zero and channel 1 repeats
    channel 0, so of the 27 patch features 9 are dead and 9 dependent."""
    teacher, shape = make("vgg")
    student = _ill_student(teacher)
    samples = torch.randn(256, *shape)
    samples[:, 2] = 0.0
    samples[:, 1] = samples[:, 0]
    result = fxkd.compress(teacher, student, samples, mode=mode, progress=False)
    rows = result.report.calibrated
    cond = rows[0].conditioning
    expected = (8, 1, 1) if mode == "pointwise" else (27, 9, 9)
    assert (cond.features, cond.dead, cond.dependent) == expected, str(result.report)
    assert cond.ill and cond.rank == expected[0] - expected[1] - expected[2]
    assert "ill-conditioned features" in rows[0].note and "ill-conditioned" in str(result.report)
    for r in rows:
        assert r.err_after <= r.err_before * (1 + 1e-3) + 1e-6, r
    with torch.no_grad():
        out = result.model(samples[:32])
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_well_posed_students_are_not_flagged():
    """Pointwise features of a planted student (pre-activation, full rank) raise no flag.
    (Kernel mode's patches after a ReLU do contain channels dead on random inputs, and those
    are flagged, rightly.)"""
    teacher, shape = make("vgg")
    result = fxkd.compress(
        teacher, plant(teacher), torch.randn(256, *shape), mode="pointwise", progress=False
    )
    assert not any(r.conditioning.ill for r in result.report.calibrated), str(result.report)


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_very_small_and_very_large_activations(scale):
    """Inputs scaled by 1e±4 through a bias-free ReLU network (positively homogeneous: every
    feature scales the same) change no error and no rank: the ridge and the condition check
    are relative to the features' own scale."""
    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10, bias=False),
    ).eval()
    student = plant(teacher)
    samples = torch.randn(128, 3, 16, 16)
    base = fxkd.compress(teacher, student, samples, num_samples=128, progress=False)
    scaled = fxkd.compress(teacher, student, samples * scale, num_samples=128, progress=False)
    for a, b in zip(base.report.calibrated, scaled.report.calibrated, strict=True):
        assert b.err_after == pytest.approx(a.err_after, rel=1e-2, abs=1e-7), (a, b)
        assert b.conditioning.rank == a.conditioning.rank
        assert b.err_after <= b.err_before * (1 + 1e-3) + 1e-6
    assert all(torch.isfinite(p).all() for p in scaled.model.parameters())
