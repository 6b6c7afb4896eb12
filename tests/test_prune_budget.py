"""prune in bounded time: torch-pruning's analysis runs under a wall-clock budget, past which
prune falls back to fxkd's own coupling analysis (scope="auto") or refuses (scope="all")."""

import logging
import signal
import time

import pytest
import torch

from fxkd.students import TorchPruningError, prune
from fxkd.students.budget import BudgetExceeded, time_budget

from models import make


def test_a_runaway_loop_is_interrupted_and_the_timer_restored():
    before = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    with pytest.raises(BudgetExceeded, match=r"budget of 0\.2 s"), time_budget(0.2):
        while True:
            pass
    assert time.perf_counter() - start < 2.0
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with time_budget(None):  # no budget: the block runs to its end
        time.sleep(0.01)


def _hanging_groups(self, *args, **kwargs):
    """Stands in for torch-pruning's group enumeration where it runs away (timm's rexnet_100
    spent over ten minutes in it)."""
    while True:
        yield from ()


@pytest.fixture
def hanging_torch_pruning(monkeypatch):
    import torch_pruning as tp

    monkeypatch.setattr(tp.DependencyGraph, "get_all_groups", _hanging_groups)


def test_a_runaway_analysis_falls_back_to_fxkds_own(hanging_torch_pruning, caplog):
    teacher, shape = make("vgg")
    x = torch.randn(2, *shape)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        student = prune(teacher, 0.5, example_inputs=x, time_budget_s=0.5)
    assert time.perf_counter() - start < 20.0
    assert "ran past its budget of 0.5 s" in caplog.text
    with torch.no_grad():
        assert student(x).shape == teacher(x).shape
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters()
    )


def test_scope_all_refuses_a_runaway_analysis_naming_the_budget(hanging_torch_pruning):
    teacher, shape = make("vgg")
    with pytest.raises(TorchPruningError, match=r"budget of 0.5 s.*Hint: raise time_budget_s"):
        prune(teacher, 0.5, example_inputs=torch.randn(2, *shape), scope="all", time_budget_s=0.5)


def test_the_analysis_shows_its_progress_unless_asked_not_to(capfd):
    teacher, shape = make("vgg")
    x = torch.randn(2, *shape)
    prune(teacher, 0.5, example_inputs=x)
    assert "fxkd prune: VGGStyle's channel groups" in capfd.readouterr().err
    prune(teacher, 0.5, example_inputs=x, progress=False)
    assert "fxkd prune" not in capfd.readouterr().err
