"""The `fxkd` command, run for real in a subprocess."""

import re
import subprocess
import sys


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
