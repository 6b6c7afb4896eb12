"""The user-facing examples run as documented and show what they claim (numbers parsed from
their output)."""

import re
import subprocess
import sys

import pytest


def _run(name: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", f"examples.{name}", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _number(pattern: str, text: str) -> list[float]:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text}"
    return [float(g) for g in m.groups()]


def test_quickstart_recovers_and_validates_onnx():
    text = _run("quickstart")
    given, recovered = _number(r"student as given ([\d.]+) -> recovered ([\d.]+)", text)
    assert recovered < given / 5
    assert "ONNX validation passed" in text
    before, after = _number(r"student (\d+) before and (\d+) after compress", text)
    assert before == after


def test_passes_pipeline_equals_compress():
    text = _run("passes_pipeline")
    (diff,) = _number(r"fxkd\.compress's model: ([\d.e+-]+)", text)
    assert diff < 1e-4
    student, recovered = _number(r"student ([\d.]+) -> recovered ([\d.]+)", text)
    assert recovered < student


def test_onnx_folding_removes_one_node_per_adapter_and_matches_the_fx_fold(tmp_path):
    text = _run("onnx_folding", "--out", str(tmp_path))
    adapters, before, after = _number(r"(\d+) adapters calibrated; Conv\+Gemm nodes (\d+) -> (\d+)",
                                      text)  # fmt: skip
    assert before - after == adapters
    (diff,) = _number(r"max abs diff ([\d.e+-]+)", text)
    assert diff < 1e-4
    assert (tmp_path / "student.onnx").is_file()


@pytest.mark.parametrize("name", ["your_own_model"])
def test_your_own_model_aligns_by_cuts_and_passes_the_support_check(name):
    text = _run(name)
    assert "cuts alignment" in text
    assert "worse=[]" in text and "same_shapes=True" in text and "onnx_passed=True" in text
    student, recovered = _number(r"student ([\d.]+) -> ([\d.]+)", text)
    assert recovered < student / 5
