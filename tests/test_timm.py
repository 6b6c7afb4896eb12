"""timm families (random init, 64×64 inputs): prune(0.5) returns a student or a typed refusal,
and compress recovers it, each model within a fixed time limit. Each case runs in its own
process, so a hang (torch-pruning's analysis once ran over ten minutes on rexnet_100) fails
its test instead of stalling the run. Slow: ``python -m pytest -m slow tests/test_timm.py``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zoo_cases import TIMM_MODELS

pytest.importorskip("timm")

LIMIT_S = 600
"""Per model: prune (its own budget: 120 s) plus check_support on 32 samples, on 2 cores."""

CASE = """
import json, logging, sys, warnings
warnings.simplefilter("ignore")
logging.disable(logging.WARNING)
import torch
from fxkd.students import prune
from fxkd.support import check_support
from tests.zoo_cases import timm_model
model = timm_model(sys.argv[1])
x = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0))
student = prune(model, 0.5, example_inputs=x[:2])
row = check_support(model, student, x)
kept = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in model.parameters())
print(json.dumps({"pairs": row.pairs, "folded": row.folded, "same_shapes": row.same_shapes,
                  "worse": row.worse, "onnx": bool(row.onnx_passed and row.onnx_same_size),
                  "kept": kept, "capture": row.capture}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_timm_model_prunes_and_compresses_in_bounded_time(name):
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(
            [sys.executable, "-c", CASE, name],
            cwd=root, capture_output=True, text=True, timeout=LIMIT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: prune + compress ran past {LIMIT_S} s")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kept"] < 1.0
    assert result["pairs"] > 0 and result["folded"] == result["pairs"], result
    assert result["same_shapes"] and not result["worse"] and result["onnx"], result
