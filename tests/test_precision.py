"""Calibration and validation run at full fp32 precision: TF32 off inside, restored after."""

import pytest
import torch

import fxkd
from fxkd.placement import full_precision

from models import make, plant


def test_full_precision_sets_and_restores_the_flags():
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        with full_precision():
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32 is True
        with pytest.raises(RuntimeError), full_precision():
            raise RuntimeError("restored on errors too")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["pointwise", "kernel"])
def test_planted_solution_on_cuda_with_tf32_enabled_outside(mode):
    """The user's TF32 setting (on) does not leak into calibration: a planted solution is
    recovered on the GPU to fp32 accuracy, and the setting is left as it was."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        teacher, shape = make("resnet")
        student = plant(teacher)
        teacher, student = teacher.cuda(), student.cuda()
        calib, held_out = torch.randn(256, *shape), torch.randn(64, *shape).cuda()
        result = fxkd.compress(teacher, student, calib, mode=mode, ridge=1e-9, progress=False)
        assert torch.get_float32_matmul_precision() == "high"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            expected, after = teacher(held_out), result.model(held_out)
        assert float((after - expected).norm() / expected.norm()) < 1e-4
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


def test_point_errors_keep_fp64_accuracy_on_large_chunks():
    """The errors reported at a point are sums of squares over millions of entries: taken per
    cache-sized slice and accumulated in fp64 they stay within 1e-5 of an fp64 reference (one
    fp32 norm over a whole 64×64×56×56 chunk is off by ~6e-4)."""
    from fxkd.passes.calibrate import relative_error

    torch.manual_seed(0)
    y = torch.randn(64, 64, 56, 56).relu_()
    v = torch.randn(64, 64, 56, 56).relu_()
    energy = float((y.double() ** 2).sum())
    exact = float(((y.double() - v.double()) ** 2).sum()) / energy
    assert abs(relative_error([v], [y], energy) - exact) < 1e-5 * exact
