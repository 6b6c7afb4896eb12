"""fxkd in one minute, with nothing to download.

A VGG-style teacher is built here and given a known structure (its first layers compute
useful, decorrelated features); the student is the teacher with every internal conv L1-pruned to
half its filters (block outputs kept), which wrecks its features. ``fxkd.compress`` recovers it
from 256 unlabelled samples in closed form, folds the adapters away (same parameter count) and
validates the ONNX export with onnxruntime.

    python -m examples.quickstart [--mode kernel|pointwise] [--onnx student.onnx]
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

import fxkd


def teacher_model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    cin = 3
    for i, w in enumerate((16, 32, 32, 64)):
        layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        if i % 2:
            layers.append(nn.MaxPool2d(2))
        cin = w
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))
    for m in model.modules():  # give BatchNorms realistic, non-trivial statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


def prune_internal(teacher: nn.Sequential, keep: float = 0.5):
    """L1 filter pruning of every conv except the last; returns (student, channel_maps)."""
    student = copy.deepcopy(teacher)
    convs = [i for i, m in enumerate(student) if isinstance(m, nn.Conv2d)]
    maps, prev = {}, None
    for n, i in enumerate(convs):
        conv, bn = student[i], student[i + 1]
        w = conv.weight.data if prev is None else conv.weight.data[:, prev]
        if n < len(convs) - 1:
            kept = w.abs().sum((1, 2, 3)).topk(round(w.shape[0] * keep)).indices.sort().values
            maps[str(i)] = kept.tolist()
        else:
            kept = torch.arange(w.shape[0])
        student[i] = nn.Conv2d(w.shape[1], len(kept), 3, padding=1, bias=False)
        student[i].weight.data = w[kept].clone()
        new_bn = nn.BatchNorm2d(len(kept)).eval()
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, name).data = getattr(bn, name).data[kept].clone()
        student[i + 1] = new_bn
        prev = kept
    return student.eval(), maps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["kernel", "pointwise"], default="kernel")
    p.add_argument("--onnx", default=None, help="where to write the ONNX file (default: temp)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    teacher = teacher_model()
    student, maps = prune_internal(teacher)
    images = torch.randn(512, 3, 32, 32)
    calib, held_out = images[:256], images[256:]
    onnx_path = args.onnx or str(Path(tempfile.mkdtemp()) / "student.onnx")

    result = fxkd.compress(
        teacher, student, calib, mode=args.mode, channel_maps=maps, onnx=onnx_path
    )
    print(result.report)
    print(result.onnx)

    def rel(model):
        with torch.no_grad():
            y, t = model(held_out), teacher(held_out)
        return float((y - t).norm() / t.norm())

    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(
        f"\nteacher {params(teacher)} parameters; student {params(student)} before and "
        f"{params(result.model)} after compress"
    )
    print(
        f"held-out logit error vs teacher: student as given {rel(student):.4f} -> "
        f"recovered {rel(result.model):.4f}  ({args.mode} mode, ONNX at {onnx_path})"
    )


if __name__ == "__main__":
    main()
