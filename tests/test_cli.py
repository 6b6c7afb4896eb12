"""The `fxkd` command, run for real in a subprocess."""

import re
import subprocess
import sys

import pytest


def _fxkd(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "fxkd.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_demo_recovers_the_pruned_student():
    out = _fxkd("demo", "--samples", "100", "--mode", "kernel")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    accs = {
        k: float(v)
        for k, v in re.findall(
            r"^\s+(teacher|student as pruned|fxkd kernel\s+"
            r"recovered)\s+([\d.]+)%",
            text,
            re.M,
        )
    }
    assert set(accs) == {"teacher", "student as pruned", "fxkd kernel     recovered"}, text
    assert accs["fxkd kernel     recovered"] > accs["student as pruned"] + 5, text
    assert "fxkd report: kernel mode, mirror alignment, 100 samples" in text


def test_bad_arguments_exit_non_zero_with_a_reason():
    out = _fxkd("demo", "--arch", "alexnet")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = _fxkd("demo", "--ratio", "1.5")
    assert out.returncode == 2 and "ratio" in out.stderr
    assert "error" in out.stderr.splitlines()[-1]


@pytest.mark.slow
def test_fashion_mnist_benchmark_quick_mode(tmp_path):
    """examples/fashion_mnist.py --quick (needs the Fashion-MNIST files; minutes)."""
    out = subprocess.run(
        [sys.executable, "examples/fashion_mnist.py", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "fashion_mnist_quick.md").read_text()
    for method in ("none", "fxkd-pw", "fxkd-kernel", "finetune", "fitnet", "mir"):
        assert f"| {method} |" in table
    assert (tmp_path / "fashion_mnist_quick_accuracy.png").stat().st_size > 10_000
