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
    text = str(result.report)
    rank = f"{cond.rank}/{cond.features}*"
    assert rank in text.splitlines()[3].split(), text  # on the site's row, marked ill
    assert "sites have ill-conditioned features" in text and "ill-conditioned" not in rows[0].note
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


def test_report_summarises_many_ill_conditioned_sites():
    """A report of many flagged sites stays a table plus one summary line, not a note per site;
    more than MAX_NOTES other notes are counted by kind."""
    from fxkd.report import MAX_NOTES, BlockRow, Report
    from fxkd.solve import Conditioning

    report = Report("mirror", "kernel", 32)
    for i in range(40):
        cond = Conditioning(features=64, dead=i % 3, dependent=1, condition=1e8)
        report.rows.append(BlockRow(f"conv{i}", f"conv{i}", "32/64", f"a{i}", 0.5, 0.5, 0.1,
                                    True, conditioning=cond))  # fmt: skip
    for i in range(MAX_NOTES + 5):
        report.rows.append(BlockRow(f"x{i}", None, "-", note=f"skipped: reason {i}"))
    report.rows.append(BlockRow("y0", None, "-", note="skipped: reason 0"))
    lines = str(report).splitlines()
    summary = [ln for ln in lines if "ill-conditioned" in ln]
    assert len(summary) == 1 and summary[0].startswith("40 of 40 sites"), summary
    assert "39 dead and 40 dependent" in summary[0]
    notes = lines[lines.index("notes:") + 1 :]
    assert notes[0] == "  2 sites (x0, y0): skipped: reason 0", notes
    assert len(notes) == MAX_NOTES + 1 and notes[-1].strip().startswith(
        "... 5 more sites (5 skipped)"
    )
    assert len(lines) == 3 + 40 + MAX_NOTES + 6 + 1 + 1 + MAX_NOTES + 1
