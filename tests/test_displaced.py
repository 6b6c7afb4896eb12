"""The patch Gram of stride-1 convs as displaced products (fxkd.solve.displaced) sums exactly what
im2col's patches do."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fxkd.solve import displaced
from fxkd.solve import normal as lstsq
from fxkd.solve.displaced import Geometry, displaced_products_fit, displaced_products_pay
from fxkd.solve.normal import NormalEquations
from fxkd.solve.patches import patch_blocks


@pytest.fixture
def always_displaced(monkeypatch):
    """Every conv that the displaced products can take goes through them, whatever it costs."""
    monkeypatch.setattr(lstsq, "displaced_products_pay", displaced_products_fit)


def test_geometry_of_a_3x3_same_conv():
    """13 displacements up to transposition; tap (−1, ·) never reads the last row, tap (+1, ·)
    never the first (likewise for columns); a strip's neighbours outside the image are not
    taken, so each of the four strips needs the 5 displacements along it."""
    geo = Geometry(nn.Conv2d(32, 32, 3, padding=1), (56, 56))
    assert geo.valid and geo.out == (56, 56)
    assert len(geo.half) == 13 and (0, 0) in geo.half and all(d >= (0, 0) for d in geo.half)
    assert geo.taps[0] == (-1, -1) and geo.excluded[0] == ((55,), (55,))
    assert geo.excluded[4] == ((), ())  # the centre tap reads every position
    assert sorted(k for k in geo.strips if k[0] != "corner") == [
        ("col", 0), ("col", 55), ("row", 0), ("row", 55)
    ]  # fmt: skip
    assert sorted(geo.strips[("row", 55)]) == [(0, dx) for dx in range(-2, 3)]
    assert geo.frame == (58, 58) and geo.lead == 2 * 58 + 2
    assert geo.cost_share() < 0.45  # ~1/3 of the direct Gram's FLOPs, plus the cross


@pytest.mark.parametrize(
    ("module", "shape", "pays"),
    [
        (nn.Conv2d(64, 32, 3, padding=1), (1, 64, 56, 56), True),
        (nn.Conv2d(256, 128, 3, padding=1), (1, 256, 14, 14), True),
        (nn.Conv2d(64, 64, 3, padding=1, stride=2), (1, 64, 56, 56), False),  # stride
        (nn.Conv2d(64, 64, 1), (1, 64, 56, 56), False),  # one tap: the direct product
        (nn.Conv2d(64, 64, 3, padding=1, padding_mode="reflect"), (1, 64, 56, 56), False),
        (nn.Conv2d(64, 64, 3, padding=3), (1, 64, 56, 56), False),  # reads beyond the span
        (nn.Conv2d(8, 8, 3, padding=1), (1, 8, 56, 56), False),  # too few channels
        (nn.Conv2d(64, 64, 3, padding=1, groups=64), (1, 64, 56, 56), False),  # depthwise
        (nn.Conv2d(32, 32, 3, padding=1), (1, 32, 16, 16), False),  # too small an input
        (nn.Conv2d(512, 512, 3, padding=1), (1, 512, 7, 7), False),  # strips cost too much
        (nn.Conv1d(64, 64, 3, padding=1), (1, 64, 56), False),
    ],
)
def test_when_the_displaced_products_are_used(module, shape, pays):
    assert displaced_products_pay(module, torch.empty(shape)) is pays


CONVS = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "padding": 0},
    {"kernel_size": 5, "padding": 2},
    {"kernel_size": (3, 5), "padding": (2, 1), "dilation": (2, 1)},
    {"kernel_size": 4, "padding": "same"},  # asymmetric padding
    {"kernel_size": 3, "padding": (0, 2), "dilation": (1, 2)},
    {"kernel_size": (1, 3), "padding": (0, 1)},
    {"kernel_size": 3, "padding": 1, "groups": 2},
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("bias", [True, False])
def test_displaced_products_sum_the_patch_normal_equations(conv, bias, always_displaced):
    """fp64, several updates of different sizes, shifted ReLU features (large means, so the
    shift terms matter): the same Gram and cross as update_blocks on F.unfold's patches."""
    module = nn.Conv2d(6, 4, **conv).double()
    g = module.groups
    k, d = module.out_channels // g, (6 // g) * math.prod(module.kernel_size)
    blocks, products = (NormalEquations(g, d, k, bias=bias) for _ in range(2))
    gen = torch.Generator().manual_seed(1)
    for n in (3, 2, 4):
        x = (torch.randn(n, 6, 7, 9, generator=gen, dtype=torch.float64) + 2).relu()
        with torch.no_grad():
            y = module(x) + 0.1 * torch.randn(module(x).shape, generator=gen, dtype=torch.float64)
        y = y.reshape(n, g, k, -1)
        blocks.update_blocks(patch_blocks(x, module), y)
        products.update_patches(x, module, y)
    assert products.route == "displaced"  # the path under test was taken
    assert products.rows == blocks.rows
    torch.testing.assert_close(products.gram, blocks.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(products.cross, blocks.cross, rtol=1e-12, atol=1e-9)


def _reference(samples: int, seed: int):
    """A 3×3 conv, shifted inputs and targets, and their normal equations by F.unfold's
    patches ("whole"), next to empty ones ("parts") for the route under test."""
    module = nn.Conv2d(6, 4, 3, padding=1).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 6, 7, 9, generator=gen, dtype=torch.float64) + 1.0
    y = torch.randn(samples, 1, 4, 63, generator=gen, dtype=torch.float64)
    whole, parts = (NormalEquations(1, 54, 4, bias=True) for _ in range(2))
    whole.update_blocks(patch_blocks(x, module), y)
    return module, x, y, whole, parts


def test_full_frames_are_multiplied_out_and_reading_midway_loses_nothing(
    always_displaced, monkeypatch
):
    """Frames of two samples' room: updates of 1, 3 (larger than the frames: they grow) and 2
    samples, the sums read between updates: every sample counted once."""
    monkeypatch.setattr(displaced, "FRAME_ELEMENTS", 2 * 6 * 9 * 11)
    module, x, y, whole, parts = _reference(6, seed=2)
    for lo, hi in ((0, 1), (1, 4), (4, 6)):
        parts.update_patches(x[lo:hi], module, y[lo:hi])
        _ = parts.gram, parts.cross
    torch.testing.assert_close(parts.gram, whole.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(parts.cross, whole.cross, rtol=1e-12, atol=1e-9)


def test_reduced_sums_are_kept_and_later_products_add_to_them(always_displaced):
    """all_reduce under a (one-rank) process group hands the assembled sums to the base and
    forgets the products: reading them after, and adding more, counts every sample once."""
    module, x, y, whole, parts = _reference(5, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1
        )
        try:
            parts.update_patches(x[:3], module, y[:3])
            parts.all_reduce()
            parts.update_patches(x[3:], module, y[3:])
            parts.all_reduce()
        finally:
            dist.destroy_process_group()
    assert parts.rows == whole.rows
    torch.testing.assert_close(parts.gram, whole.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(parts.cross, whole.cross, rtol=1e-12, atol=1e-9)


def test_kernel_mode_calibration_folds_the_same_student_either_way(monkeypatch):
    """A residual pair in kernel mode, fp64: the student folded with displaced products at
    every stride-1 conv equals the one folded with im2col's (same solves, same reports)."""
    from models import calibrated_resnet_fp64

    runs = {}
    for name, rule in (("direct", lambda m, x: False), ("displaced", displaced_products_fit)):
        taken = []

        def recorded(m, x, rule=rule, taken=taken):
            taken.append(rule(m, x))
            return taken[-1]

        monkeypatch.setattr(lstsq, "displaced_products_pay", recorded)
        runs[name] = calibrated_resnet_fp64("kernel", samples=24)
        assert any(taken) == (name == "displaced")
    (direct, e_direct), (products, e_products) = runs["direct"], runs["displaced"]
    for key, value in direct.items():
        torch.testing.assert_close(products[key], value, rtol=1e-9, atol=1e-12)
    assert e_products == pytest.approx(e_direct, rel=1e-8, abs=1e-14)


@pytest.mark.cuda
def test_displaced_products_on_the_gpu_equal_the_cpus(always_displaced):
    """The frames' flat offsets and strided strips on a CUDA device (fp64): the same sums as
    im2col on the CPU. Off by default there (``DEVICES``) until timed: this checks them."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    module = nn.Conv2d(6, 4, 3, padding=1).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 6, 7, 9, generator=gen, dtype=torch.float64) + 1.0
    y = torch.randn(5, 1, 4, 63, generator=gen, dtype=torch.float64)
    cpu = NormalEquations(1, 54, 4, bias=True)
    cpu.update_blocks(patch_blocks(x, module), y)
    gpu = NormalEquations(1, 54, 4, bias=True, device="cuda")
    gpu.update_patches(x.cuda(), module.cuda(), y.cuda())
    assert gpu.route == "displaced"
    torch.testing.assert_close(gpu.gram.cpu(), cpu.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(gpu.cross.cpu(), cpu.cross, rtol=1e-12, atol=1e-9)


def test_the_default_route_is_the_direct_product_off_the_listed_devices(monkeypatch):
    """``DEVICES`` gates the default: a conv that pays on the CPU does not elsewhere."""
    conv, x = nn.Conv2d(64, 32, 3, padding=1), torch.empty(1, 64, 56, 56)
    assert displaced_products_pay(conv, x)
    monkeypatch.setattr(displaced, "DEVICES", ())
    assert not displaced_products_pay(conv, x)
