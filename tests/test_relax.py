"""Targets relaxed through the clamp that reads a point (fxkd.solve.relax): structure (which
points qualify), the relaxation's algebra, exactness on planted students, and the fit after the
nonlinearity improving on the plain pre-activation fit."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxkd
from fxkd.capture import trace
from fxkd.cli.datasets import normalize
from fxkd.nodes import clamp_bounds
from fxkd.solve.relax import relaxed_targets

from models import make, plant

INF = float("inf")


class Readers(nn.Module):
    """Points read by a ReLU module, F.relu, ReLU6, a hardtanh, and one also read by a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(5))
        self.relu, self.relu6, self.tanh = nn.ReLU(inplace=True), nn.ReLU6(), nn.Hardtanh(-1, 2)

    def forward(self, x):
        a = self.relu(self.convs[0](x))
        b = F.relu(self.convs[1](a))
        c = self.relu6(self.convs[2](b))
        d = self.tanh(self.convs[3](c))
        e = self.convs[4](d)
        return torch.relu(e) + e  # e is also read as itself


def test_clamp_bounds_names_the_clamp_of_points_read_only_through_it():
    gm = trace(Readers(), torch.randn(1, 4, 3, 3))
    nodes = {n.name: n for n in gm.graph.nodes}
    got = [clamp_bounds(gm, nodes[f"convs_{i}"]) for i in range(5)]
    assert got == [(0.0, INF), (0.0, INF), (0.0, 6.0), (-1.0, 2.0), None]


def test_relaxed_targets_keep_the_range_and_push_clamped_rows_into_the_clamp():
    t = torch.tensor([-2.0, -1.0, 0.5, 3.0, 7.0, 8.0])
    p = torch.tensor([1.0, -3.0, 0.0, 9.0, 5.0, 9.0])
    assert relaxed_targets(t, p, 0.0, INF).tolist() == [0.0, -3.0, 0.5, 3.0, 7.0, 8.0]
    assert relaxed_targets(t, p, 0.0, 6.0).tolist() == [0.0, -3.0, 0.5, 3.0, 6.0, 9.0]
    # a prediction already matching the teacher is its own relaxed target (a fixed point)
    assert torch.equal(relaxed_targets(t, t, 0.0, 6.0), t)


@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_planted_students_stay_exact_with_relaxed_targets(name, mode):
    """The exact solution fits every target, so relaxation leaves it where it is: recovered to
    1e-4, with and without relax rounds, and every ReLU-read point reported as relaxed."""
    teacher, shape = make(name)
    student = plant(teacher)
    calib, held_out = torch.randn(256, *shape), torch.randn(64, *shape)
    result = fxkd.compress(teacher, student, calib, mode=mode, ridge=1e-9, relax_rounds=3,
                           progress=False)  # fmt: skip
    with torch.no_grad():
        expected, after = teacher(held_out), result.model(held_out)
    assert float((after - expected).norm() / expected.norm()) < 1e-4
    rows = result.report.calibrated
    assert rows[-1].relaxed is None  # the head's logits are read as they are
    assert sum(r.relaxed == (0.0, INF) for r in rows) >= len(rows) // 2  # ReLU-read points


def test_relaxed_targets_recover_a_heavily_pruned_trained_student_better():
    """The shipped Fashion-MNIST VGG teacher, every conv L1-pruned by 75%, 100 unlabelled
    images of the shipped subset: fitting what each ReLU passes on (3 rounds) brings the logits
    closer to the teacher's and the accuracy on the shipped test subset up by over 5 points
    (61.3% -> 75.2% when measured), with every point's error after its solve below its error
    before. (On the pruner's channel maps: channel selection, measured in test_select.py, is
    off here so the relaxation is measured alone.)"""
    from fxkd.cli.demo import ASSETS, accuracy, load_teacher
    from fxkd.students import prune

    subset = np.load(ASSETS / "fashion_mnist_subset.npz")
    pool = normalize(torch.from_numpy(subset["train_images"]))
    x_test = normalize(torch.from_numpy(subset["test_images"]))
    y_test = torch.from_numpy(subset["test_labels"]).long()
    teacher = load_teacher("vgg")
    student = prune(teacher, 0.75, importance="l1", example_inputs=pool[:1])
    logit_error, acc, results = {}, {}, {}
    for rounds in (0, 3):
        result = fxkd.compress(teacher, student, pool[:100], num_samples=100,
                               relax_rounds=rounds, select_channels=False,
                               progress=False)  # fmt: skip
        with torch.no_grad():
            t = teacher(x_test)
            logit_error[rounds] = float((result.model(x_test) - t).norm() / t.norm())
        acc[rounds] = accuracy(result.model, x_test, y_test)
        results[rounds] = result
    assert logit_error[3] < 0.9 * logit_error[0], logit_error
    assert acc[3] > acc[0] + 0.05, acc
    for r in results[3].report.calibrated:
        assert r.err_after <= r.err_before * (1 + 1e-3) + 1e-6, r
