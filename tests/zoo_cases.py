"""Model-zoo cases for fxkd: (architecture, student kind) → teacher, student, samples.
torchvision classifiers and segmentation models, and Hugging Face transformers models built
from small configs (``hf_*``; nothing downloaded). Random init (seeded), BatchNorms given
non-trivial statistics, eval mode, small inputs. Shared by tests/test_zoo.py,
tests/test_transformers.py and examples.benchmarks.zoo_support (the support table)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn

from fxkd.inputs import Inputs
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
    "squeezenet1_1",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large",
]
HF_ARCHS = ["hf_vit", "hf_resnet", "hf_convnext", "hf_bert", "hf_mobilevit"]
"""transformers models: symbolic tracing fails on every one, torch.export captures them."""
TIMM_MODELS = {
    "resnet18": {},
    "rexnet_100": {},  # partial-channel residuals; torch-pruning's analysis ran > 10 min
    "regnetx_002": {},  # BatchNormAct2d: symbolic tracing sees F.batch_norm
    "efficientnet_b0": {},
    "mobilenetv3_large_100": {},
    "convnext_atto": {},
    "ghostnet_100": {},
    "mixnet_s": {},
    "repvgg_a0": {},
    "densenet121": {},
    "mobilevit_xxs": {},
    "deit_tiny_patch16_224": {"img_size": 64},
    "levit_128s": {"img_size": 64},
    "swin_tiny_patch4_window7_224": {"img_size": 64, "window_size": 4},  # windowed attention
}
"""timm families (random init, 64×64 inputs) for the slow suite and the prune benchmark."""
KINDS = ["l1", "bn", "decouple"]
NO_BATCHNORM = {"vit", "hf_vit", "hf_bert", "hf_convnext"}  # slimming needs BatchNorm scales
NO_CONV = {"hf_bert"}  # nothing to decouple
SEGMENTATION = {"fcn_resnet50", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"}
DEPTH = ("resnet34", "resnet18")  # a hand-designed shallower student


def timm_model(name: str, seed: int = 0) -> nn.Module:
    """A timm model (10 classes, random init with non-trivial BatchNorm statistics)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **TIMM_MODELS[name])
    return randomize_bn(model, seed).eval()


def hf_model(arch: str) -> nn.Module:
    """A small transformers model from a config (random init, nothing downloaded)."""
    import transformers as T

    if arch == "hf_vit":
        return T.ViTForImageClassification(
            T.ViTConfig(
                image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, num_labels=5,
            )
        )  # fmt: skip
    if arch == "hf_resnet":
        return T.ResNetForImageClassification(
            T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)
        )
    if arch == "hf_convnext":
        return T.ConvNextForImageClassification(
            T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5)
        )
    if arch == "hf_bert":
        return T.BertForSequenceClassification(
            T.BertConfig(
                vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, num_labels=3,
            )
        )  # fmt: skip
    if arch == "hf_mobilevit":
        return T.MobileViTForImageClassification(
            T.MobileViTConfig(
                image_size=32, hidden_sizes=[16, 24, 32],
                neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=5,
            )
        )  # fmt: skip
    raise KeyError(arch)


def realistic(model: nn.Module, seed: int = 0) -> nn.Module:
    """transformers' init draws norm scales from N(0, 0.02) for some models (MobileViT's
    BatchNorms): activations then vanish layer by layer and every output is 0. Unit scales and
    He-initialised convs, as a trained model would roughly have, then non-trivial BatchNorm
    statistics."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    return randomize_bn(model, seed).eval()


def token_batches(n: int = 32, seed: int = 1, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    """A text loader's batches: ``input_ids`` and ``attention_mask`` (padded tails), labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, 8), generator=g)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[n // 2 :, 6:] = 0
    return [
        {"input_ids": ids[i : i + batch], "attention_mask": mask[i : i + batch],
         "labels": ids[i : i + batch, 0]}
        for i in range(0, n, batch)
    ]  # fmt: skip


def build(arch: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A randomly initialised model (10 classes; 5 for segmentation and transformers) and its
    input shape (per sample; ``hf_bert`` takes 8 token ids and a mask)."""
    torch.manual_seed(seed)
    if arch in HF_ARCHS:
        return realistic(hf_model(arch), seed), (8,) if arch == "hf_bert" else (3, 32, 32)
    if arch in SEGMENTATION:
        model = tvm.segmentation.__dict__[arch](num_classes=5, weights_backbone=None)
        return randomize_bn(model, seed), (3, 64, 64)
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
    samples: torch.Tensor | Inputs


def make_case(arch: str, kind: str, samples: int = 32, seed: int = 0) -> Case:
    """``kind``: "l1" / "bn" (fxkd.students.pruning at 50%), "decouple" (rank 1), or "depth"
    (arch is the teacher, DEPTH's student)."""
    if kind == "depth":
        teacher, shape = build(arch, seed)
        student, _ = build(DEPTH[1], seed + 1)
    else:
        teacher, shape = build(arch, seed)
        if kind == "decouple":
            student = decouple(teacher, example_inputs=_samples(arch, shape, 2, seed))
        else:
            example = _samples(arch, shape, 2, seed)
            # a ViT's hidden width is hard-coded in its reshapes: prune the MLPs only
            ignored = [teacher.conv_proj, teacher.heads.head] if arch == "vit" else None
            student = prune(
                teacher, 0.5, importance=kind, example_inputs=example, ignored_layers=ignored
            )
    return Case(f"{arch}/{kind}", teacher, student, _samples(arch, shape, samples, seed))


def _samples(arch: str, shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor | Inputs:
    if arch == "hf_bert":
        batch = token_batches(n, seed, batch=n)[0]
        return Inputs((), {k: v for k, v in batch.items() if k != "labels"})
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
