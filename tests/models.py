"""A tiny model zoo for the tests, and helpers that build students from teachers."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, bias: bool = False
) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout)]


class VGGStyle(nn.Module):
    """Plain conv-bn-relu stacks with pooling and a Linear head."""

    def __init__(self, widths=(8, 16, 16, 32), classes: int = 10, cin: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        for i, w in enumerate(widths):
            layers += [*conv_bn(c, w), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, mid: int | None = None) -> None:
        super().__init__()
        mid = mid or cout
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        return self.relu(out + identity)


class ResNetStyle(nn.Module):
    """Stem, three stages of basic blocks (identity and projection shortcuts), Linear head."""

    def __init__(self, widths=(8, 16, 32), mids=None, classes: int = 10, cin: int = 3) -> None:
        super().__init__()
        mids = mids or widths
        self.stem = nn.Sequential(*conv_bn(cin, widths[0]), nn.ReLU())
        blocks = []
        c = widths[0]
        for i, (w, m) in enumerate(zip(widths, mids, strict=True)):
            blocks += [BasicBlock(c, w, 1 if i == 0 else 2, m), BasicBlock(w, w, 1, m)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(
            torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)
        )


class GroupedNet(nn.Module):
    """Grouped and depthwise convs, with and without bias/BN (MobileNet-like)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=True)
        self.act = nn.ReLU6()
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.gbn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=True)
        self.pw = nn.Conv2d(16, 24, 1, bias=False)
        self.pbn = nn.BatchNorm2d(24)
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = nn.functional.silu(self.gbn(self.grouped(x)))
        x = nn.functional.relu(self.dw(x))
        x = torch.relu(self.pbn(self.pw(x)))
        return self.head(x.mean(dim=(2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 12, 5, padding=2)
        self.bn = nn.BatchNorm1d(12)
        self.c2 = nn.Conv1d(12, 12, 3, dilation=2, padding="same", bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = nn.functional.gelu(self.bn(self.c1(x)))
        x = nn.functional.gelu(self.c2(x))
        return self.head(x.mean(-1))


class MLP(nn.Module):
    def __init__(self, widths=(20, 32, 32, 6)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.bn = nn.BatchNorm1d(widths[1])

    def forward(self, x):
        x = torch.relu(self.bn(self.layers[0](x)))
        for layer in self.layers[1:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


class ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock in miniature: depthwise 7x7, channels-last LayerNorm and MLP, layer
    scale, dropout (identity in eval), residual add. The second Linear's site is seen through
    the permute, the layer scale and the dropout to the add."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(nn.functional.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return self.drop(self.layer_scale * y) + x  # torchvision's order: block, then input


class ConvNeXtStyle(nn.Module):
    def __init__(self, dim: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


ZOO = {
    "vgg": (lambda: VGGStyle(), (3, 16, 16)),
    "resnet": (lambda: ResNetStyle(), (3, 16, 16)),
    "grouped": (lambda: GroupedNet(), (3, 12, 12)),
    "conv1d": (lambda: Conv1dNet(), (4, 32)),
    "mlp": (lambda: MLP(), (20,)),
    "convnext": (lambda: ConvNeXtStyle(), (3, 16, 16)),
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    factory, shape = ZOO[name]
    return randomize_bn(factory(), seed), shape


def plant(teacher: nn.Module, scale: float = 0.2, seed: int = 1) -> nn.Module:
    """A student whose every conv/linear output is mixed by a random invertible matrix near
    identity (block-diagonal over groups): the exact recovery is known to exist."""
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                groups = getattr(m, "groups", 1)
                c = m.weight.shape[0]
                k = c // groups
                mix = torch.eye(k) + scale * torch.randn(groups, k, k, generator=g) / k**0.5
                w = m.weight.reshape(groups, k, -1)
                m.weight.copy_(torch.bmm(mix, w).reshape(m.weight.shape))
                if m.bias is not None:
                    m.bias.copy_(torch.bmm(mix, m.bias.reshape(groups, k, 1)).reshape(c))
    return student


def prune_internal_vgg(teacher: VGGStyle, keep: float = 0.5):
    """L1-prune every conv but the last (block output kept); returns (student, channel_maps)."""
    student = copy.deepcopy(teacher)
    convs = [i for i, m in enumerate(student.features) if isinstance(m, nn.Conv2d)]
    maps: dict[str, list[int]] = {}
    prev_keep = None
    for n, i in enumerate(convs):
        conv, bn = student.features[i], student.features[i + 1]
        w = conv.weight.data
        if prev_keep is not None:
            w = w[:, prev_keep]
        if n < len(convs) - 1:
            kept = w.abs().sum(dim=(1, 2, 3)).topk(max(1, round(w.shape[0] * keep))).indices
            kept = kept.sort().values
            maps[f"features.{i}"] = kept.tolist()
        else:
            kept = torch.arange(w.shape[0])
        new = nn.Conv2d(
            w.shape[1],
            len(kept),
            conv.kernel_size,
            conv.stride,
            conv.padding,
            bias=conv.bias is not None,
        )
        new.weight.data = w[kept].clone()
        if conv.bias is not None:
            new.bias.data = conv.bias.data[kept].clone()
        student.features[i] = new
        student.features[i + 1] = _slice_bn(bn, kept)
        prev_keep = kept
    return student.eval(), maps


def prune_internal_resnet(teacher: ResNetStyle, keep: float = 0.5):
    """L1-prune conv1 of every block (block outputs kept); returns (student, channel_maps)."""
    student = copy.deepcopy(teacher)
    maps: dict[str, list[int]] = {}
    for b, block in enumerate(student.blocks):
        w = block.conv1.weight.data
        kept = w.abs().sum(dim=(1, 2, 3)).topk(max(1, round(w.shape[0] * keep))).indices
        kept = kept.sort().values
        maps[f"blocks.{b}.conv1"] = kept.tolist()
        c1 = nn.Conv2d(w.shape[1], len(kept), 3, block.conv1.stride, 1, bias=False)
        c1.weight.data = w[kept].clone()
        c2 = nn.Conv2d(len(kept), block.conv2.out_channels, 3, 1, 1, bias=False)
        c2.weight.data = block.conv2.weight.data[:, kept].clone()
        block.conv1, block.bn1, block.conv2 = c1, _slice_bn(block.bn1, kept), c2
    return student.eval(), maps


def _slice_bn(bn: nn.BatchNorm2d, kept: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(kept))
    for name in ("weight", "bias"):
        getattr(new, name).data = getattr(bn, name).data[kept].clone()
    new.running_mean = bn.running_mean[kept].clone()
    new.running_var = bn.running_var[kept].clone()
    return new.eval()


def calibrated_resnet_fp64(mode: str, samples: int, seed: int = 4):
    """The residual pair (blocks' conv1 pruned by half) compressed in fp64 on ``samples``
    random inputs: (folded student's state dict, each calibrated point's error after)."""
    import fxkd

    teacher, shape = make("resnet")
    student, maps = prune_internal_resnet(teacher)
    x = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(seed)).double()
    result = fxkd.compress(
        teacher.double(), student.double(), x, channel_maps=maps, mode=mode,
        num_samples=samples, progress=False,
    )  # fmt: skip
    return result.model.state_dict(), [r.err_after for r in result.report.calibrated]
