"""Your own model: a network written here, and a hand-designed student of another depth.

Nothing in fxkd is specific to a model zoo. The teacher below is a small residual network with
three stages of two blocks each; the student is a narrower network with one block per stage,
written independently (no pruning, no channel maps). fxkd aligns them at block boundaries,
stage by stage (dominator cuts, matched by shape with dynamic programming), recovers the student
from 256 unlabelled samples and checks the result with ``fxkd.support.check_support``: no point
worse after its solve, every parameter shape unchanged, ONNX parity.

    python -m examples.your_own_model
"""

from __future__ import annotations

import torch
from torch import nn

import fxkd
from fxkd.support import check_support


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class Net(nn.Module):
    def __init__(self, widths: tuple[int, ...], depth: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())  # fmt: skip
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for d in range(depth):
                blocks.append(Block(cin, w, 2 if (d == 0 and i > 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def main() -> None:
    torch.manual_seed(0)
    teacher = Net((32, 64, 128), depth=2).eval()
    student = Net((32, 64, 128), depth=1).eval()  # half the blocks: another depth
    for m in [*teacher.modules(), *student.modules()]:  # realistic BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
    samples = torch.randn(256, 3, 32, 32)

    result = fxkd.compress(teacher, student, samples, progress=False)
    print(result.report)

    row = check_support(teacher, student, samples, progress=False)
    print(f"\nsupport check: {row}")
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        t = teacher(x)
        before, after = student(x), result.model(x)
    rel = lambda y: float((y - t).norm() / t.norm())  # noqa: E731
    print(f"held-out logit error vs teacher: student {rel(before):.4f} -> {rel(after):.4f}")


if __name__ == "__main__":
    main()
