"""Random fx-traceable networks for property-based tests (hypothesis strategies)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
}
CONV = {1: nn.Conv1d, 2: nn.Conv2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
POOL = {1: (nn.MaxPool1d, nn.AvgPool1d), 2: (nn.MaxPool2d, nn.AvgPool2d)}


def _bn(dims: int, c: int, g: torch.Generator) -> nn.Module:
    bn = BN[dims](c)
    bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
    bn.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return bn


class ConvUnit(nn.Module):
    """conv (k, stride, dilation, groups, bias) [+ BN] + activation."""

    def __init__(self, spec: dict, dims: int, cin: int, g: torch.Generator) -> None:
        super().__init__()
        groups = {
            "dense": 1,
            "grouped": 2 if cin % 2 == 0 and spec["cout"] % 2 == 0 else 1,
            "depthwise": cin,
        }[spec["groups"]]
        cout = cin * spec["mult"] if spec["groups"] == "depthwise" else spec["cout"]
        k, d = spec["k"], spec["dilation"]
        self.conv = CONV[dims](
            cin, cout, k, spec["stride"], d * (k - 1) // 2, d, groups, bias=spec["bias"]
        )
        self.bn = _bn(dims, cout, g) if spec["bn"] else None
        self.act = ACTIVATIONS[spec["act"]]()
        self.cout = cout

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return self.act(y)


class Residual(nn.Module):
    """conv-bn-act-conv-bn + identity or 1x1 projection shortcut, then activation."""

    def __init__(self, spec: dict, dims: int, cin: int, g: torch.Generator) -> None:
        super().__init__()
        cout, stride = spec["cout"], spec["stride"]
        self.c1 = CONV[dims](cin, cout, 3, stride, 1, bias=False)
        self.b1 = _bn(dims, cout, g)
        self.c2 = CONV[dims](cout, cout, 3, 1, 1, bias=spec["bias"])
        self.b2 = _bn(dims, cout, g)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(
                CONV[dims](cin, cout, 1, stride, bias=False), _bn(dims, cout, g)
            )
        self.act = ACTIVATIONS[spec["act"]]()
        self.cout = cout

    def forward(self, x):
        y = self.b2(self.c2(self.act(self.b1(self.c1(x)))))
        return self.act(y + (x if self.proj is None else self.proj(x)))


class Concat(nn.Module):
    """Two conv branches (3x3 and 1x1) concatenated along channels, then activation."""

    def __init__(self, spec: dict, dims: int, cin: int, g: torch.Generator) -> None:
        super().__init__()
        half = max(1, spec["cout"] // 2)
        self.a = CONV[dims](cin, half, 3, 1, 1)
        self.b = CONV[dims](cin, half, 1)
        self.bn = _bn(dims, half, g)
        self.act = ACTIVATIONS[spec["act"]]()
        self.cout = 2 * half

    def forward(self, x):
        return self.act(torch.cat([self.a(x), self.bn(self.b(x))], dim=1))


class Pool(nn.Module):
    def __init__(self, spec: dict, dims: int, cin: int, g: torch.Generator) -> None:
        super().__init__()
        self.pool = POOL[dims][spec["avg"]](2, ceil_mode=True)
        self.cout = cin

    def forward(self, x):
        return self.pool(x)


BLOCKS = {"conv": ConvUnit, "residual": Residual, "concat": Concat, "pool": Pool}


class RandomNet(nn.Module):
    def __init__(self, spec: dict) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(spec["seed"])
        torch.manual_seed(spec["seed"])
        dims, c = spec["dims"], spec["cin"]
        blocks = []
        for b in spec["blocks"]:
            block = BLOCKS[b["kind"]](b, dims, c, g)
            blocks.append(block)
            c = block.cout
        self.blocks = nn.Sequential(*blocks)
        self.hidden = nn.Linear(c, spec["hidden"]) if spec["hidden"] else None
        self.head = nn.Linear(spec["hidden"] or c, 3)
        self.dims = dims
        self.eval()

    def forward(self, x):
        x = self.blocks(x)
        x = x.mean(dim=tuple(range(2, 2 + self.dims)))
        if self.hidden is not None:
            x = torch.relu(self.hidden(x))
        return self.head(x)


def block_spec(kind: str):
    return st.fixed_dictionaries(
        {
            "kind": st.just(kind),
            "cout": st.sampled_from([4, 6, 8]),
            "k": st.sampled_from([1, 3, 5]),
            "stride": st.sampled_from([1, 1, 2]),
            "dilation": st.sampled_from([1, 1, 2]),
            "groups": st.sampled_from(["dense", "dense", "grouped", "depthwise"]),
            "mult": st.sampled_from([1, 2]),
            "bias": st.booleans(),
            "bn": st.booleans(),
            "act": st.sampled_from(sorted(ACTIVATIONS)),
            "avg": st.booleans(),
        }
    )


net_specs = st.fixed_dictionaries(
    {
        "dims": st.sampled_from([1, 2]),
        "cin": st.sampled_from([1, 3, 4]),
        "size": st.sampled_from([8, 11]),
        "blocks": st.lists(
            st.sampled_from(["conv", "conv", "residual", "concat", "pool"]).flatmap(block_spec),
            min_size=1,
            max_size=4,
        ),
        "hidden": st.sampled_from([0, 0, 8]),
        "seed": st.integers(0, 2**16),
    }
)


def input_shape(spec: dict) -> tuple[int, ...]:
    return (spec["cin"], *([spec["size"]] * spec["dims"]))
