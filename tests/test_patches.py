import pytest
import torch
from torch import nn

from fxkd.solve.patches import blocks, patch_blocks, patches, rows

CASES = [
    ("conv1d-k5-s2", lambda: nn.Conv1d(6, 4, 5, stride=2, padding=1), (2, 6, 17)),
    ("conv1d-same-dil2", lambda: nn.Conv1d(6, 6, 4, dilation=2, padding="same"), (2, 6, 15)),
    ("conv2d-k3", lambda: nn.Conv2d(4, 8, 3, padding=1), (2, 4, 7, 9)),
    ("conv2d-grouped-s2", lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4), (2, 8, 9, 9)),
    (
        "conv2d-depthwise-dil",
        lambda: nn.Conv2d(6, 12, 3, padding=2, dilation=2, groups=6),
        (2, 6, 8, 8),
    ),
    ("conv2d-valid-rect", lambda: nn.Conv2d(3, 5, (3, 1), padding="valid"), (1, 3, 6, 5)),
    ("conv3d", lambda: nn.Conv3d(4, 6, 3, stride=(1, 2, 1), padding=1, groups=2), (2, 4, 5, 6, 4)),
    ("linear", lambda: nn.Linear(7, 3), (2, 5, 7)),
]


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
def test_patches_times_kernel_is_the_layer(name, factory, shape):
    torch.manual_seed(0)
    layer = factory().double()
    x = torch.randn(*shape, dtype=torch.float64)
    expected = layer(x)
    dims = 0 if isinstance(layer, nn.Linear) else x.dim() - 2
    p = patches(x, layer)  # (rows, G, D)
    g = p.shape[1]
    w = layer.weight.reshape(g, layer.weight.shape[0] // g, -1)  # (G, K, D)
    out = torch.einsum("rgd,gkd->rgk", p, w).reshape(p.shape[0], -1) + layer.bias
    torch.testing.assert_close(out, rows(expected, dims), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
def test_patch_blocks_times_kernel_is_the_layer_in_blocks(name, factory, shape):
    """The feature-major layout the solver takes: (B, G, D, L) patches, (B, G, K, L) outputs."""
    torch.manual_seed(0)
    layer = factory().double()
    x = torch.randn(*shape, dtype=torch.float64)
    dims = 0 if isinstance(layer, nn.Linear) else x.dim() - 2
    groups = getattr(layer, "groups", 1)
    p = patch_blocks(x, layer)
    w = layer.weight.reshape(groups, layer.weight.shape[0] // groups, -1)  # (G, K, D)
    out = torch.einsum("bgdl,gkd->bgkl", p, w)
    expected = blocks(layer(x) - layer.bias.reshape(-1, *[1] * dims), dims, groups)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
