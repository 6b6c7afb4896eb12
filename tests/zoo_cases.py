"""torchvision model-zoo cases for fxkd: (architecture, student kind) → teacher, student,
samples. Random init (seeded), BatchNorms given non-trivial statistics, eval mode, small
inputs. Shared by tests/test_zoo.py and examples.benchmarks.zoo_support (the support table)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn

from fxkd.students import decouple, prune
from tests.models import randomize_bn

ARCHS = [
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "densenet121",
    "efficientnet_b0",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
    "vit",
]
KINDS = ["l1", "bn", "decouple"]
NO_BATCHNORM = {"vit"}  # network slimming needs BatchNorm scales
DEPTH = ("resnet34", "resnet18")  # a hand-designed shallower student


def build(arch: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A randomly initialised torchvision model (10 classes) and its input shape."""
    torch.manual_seed(seed)
    if arch == "vit":
        model = tvm.VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=10,
        )
        nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initialises it
        return model.eval(), (3, 32, 32)
    model = getattr(tvm, arch)(num_classes=10)
    if arch == "convnext_tiny":  # torchvision initialises layer scale at 1e-6: blocks ≈ identity
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.data.uniform_(0.1, 1.0)
    return randomize_bn(model, seed), (3, 64, 64)


@dataclass
class Case:
    name: str
    teacher: nn.Module
    student: nn.Module
    samples: torch.Tensor


def make_case(arch: str, kind: str, samples: int = 32, seed: int = 0) -> Case:
    """``kind``: "l1" / "bn" (fxkd.students.pruning at 50%), "decouple" (rank 1), or "depth"
    (arch is the teacher, DEPTH's student)."""
    if kind == "depth":
        teacher, shape = build(arch, seed)
        student, _ = build(DEPTH[1], seed + 1)
    else:
        teacher, shape = build(arch, seed)
        if kind == "decouple":
            student = decouple(teacher)
        else:
            example = torch.randn(2, *shape)
            # a ViT's hidden width is hard-coded in its reshapes: prune the MLPs only
            ignored = [teacher.conv_proj, teacher.heads.head] if arch == "vit" else None
            student = prune(
                teacher, 0.5, importance=kind, example_inputs=example, ignored_layers=ignored
            )
    x = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(seed))
    return Case(f"{arch}/{kind}", teacher, student, x)
