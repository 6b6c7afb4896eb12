"""The demo: recover an L1-pruned Fashion-MNIST VGG from 100 unlabelled images.

Everything it needs ships with fxkd: the trained teacher (fxkd/assets/fashion_vgg.pt, made by
examples/tools/train_teacher.py) and a 1,000-image unlabelled pool plus 2,000 labelled test images
(fxkd/assets/fashion_mnist_subset.npz). When the full Fashion-MNIST test set is on the machine,
accuracy is measured on all 10,000 images instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fxkd.api import CompressResult, compress
from fxkd.cli.datasets import find_fashion_mnist, load_fashion_mnist, normalize
from fxkd.cli.zoo import build
from fxkd.cost import count_macs
from fxkd.errors import ConfigError
from fxkd.students import prune

__all__ = ["ASSETS", "DemoResult", "accuracy", "load_teacher", "run_demo"]

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parents[1] / "assets"


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000
) -> float:
    """Top-1 accuracy (eval mode, training flag restored)."""
    flag = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += int((model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
    model.train(flag)
    return correct / len(images)


def load_teacher(arch: str = "vgg") -> nn.Module:
    """The shipped Fashion-MNIST teacher, its checksum verified against its card."""
    ckpt, card_path = ASSETS / f"fashion_{arch}.pt", ASSETS / f"fashion_{arch}.json"
    if not ckpt.exists():
        raise ConfigError(
            f"no shipped teacher for arch={arch!r} ({ckpt} missing). Hint: train one with "
            f"python -m examples.tools.train_teacher --arch {arch}"
        )
    card = json.loads(card_path.read_text())
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    if digest != card["sha256"]:
        raise ConfigError(f"{ckpt} does not match the sha256 in {card_path}; re-train or re-fetch")
    model = build(arch)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    return model.eval()


@dataclass
class DemoResult:
    """Accuracies (teacher, student as pruned, recovered per mode), sizes, costs, timings."""

    test_set: str
    num_samples: int
    teacher_acc: float
    pruned_acc: float
    recovered: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    teacher_params: int = 0
    student_params: int = 0
    teacher_macs: int = 0
    student_macs: int = 0
    recovered_macs: int = 0
    results: dict[str, CompressResult] = field(default_factory=dict)
    compress_result: CompressResult | None = None  # the last mode's (exported when asked)


def _test_set(data_dir: str | None, which: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The labelled test images: the full set (``which`` "full", or "auto" when its IDX files
    are found) or the shipped subset ("shipped", or "auto" when they are not)."""
    found = find_fashion_mnist(data_dir) if which != "shipped" else None
    if which == "full" and found is None:
        raise ConfigError("no Fashion-MNIST IDX files found for the full test set")
    if found is not None:
        x, y = load_fashion_mnist("test", data_dir)
        return "Fashion-MNIST test set (10,000 images)", normalize(x), y
    sub = np.load(ASSETS / "fashion_mnist_subset.npz")
    x, y = torch.from_numpy(sub["test_images"]), torch.from_numpy(sub["test_labels"]).long()
    return "shipped Fashion-MNIST test subset (2,000 images)", normalize(x), y


def run_demo(
    *,
    arch: str = "vgg",
    ratio: float = 0.5,
    num_samples: int = 100,
    modes: tuple[str, ...] = ("pointwise", "kernel"),
    onnx: str | Path | None = None,
    data_dir: str | None = None,
    test_set: str = "auto",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> DemoResult:
    """Prune the shipped teacher (L1, ``ratio`` of every conv's filters, block outputs too),
    recover it with ``compress`` in each mode from ``num_samples`` unlabelled images, measure
    accuracy (on the test set ``test_set`` names: "auto", "full" or "shipped"), parameters and
    MACs. The last mode's result is exported to ``onnx`` (when given) and validated with
    onnxruntime. Each step is logged at INFO (the CLI shows them as progress lines)."""
    if not 0 < num_samples <= 1000:
        raise ConfigError(f"num_samples={num_samples} must be in 1..1000 (the shipped pool)")
    teacher = load_teacher(arch).to(device)
    pool = torch.from_numpy(np.load(ASSETS / "fashion_mnist_subset.npz")["train_images"])
    g = torch.Generator().manual_seed(seed)
    samples = normalize(pool[torch.randperm(len(pool), generator=g)[:num_samples]]).to(device)
    log.info("pruning %s: %.0f%% of every conv's filters (L1)", arch, 100 * ratio)
    student = prune(teacher, ratio, importance="l1", example_inputs=samples[:1])
    name, x_test, y_test = _test_set(data_dir, test_set)
    x_test, y_test = x_test.to(device), y_test.to(device)
    log.info("measuring the teacher's and the pruned student's accuracy on the %s", name)
    result = DemoResult(
        name,
        len(samples),
        accuracy(teacher, x_test, y_test),
        accuracy(student, x_test, y_test),
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        student_params=sum(p.numel() for p in student.parameters()),
        teacher_macs=count_macs(teacher, samples[:1]),
        student_macs=count_macs(student, samples[:1]),
    )
    for i, mode in enumerate(modes):
        export = onnx is not None and i == len(modes) - 1
        log.info(
            "recovering the student in %s mode from %d unlabelled samples%s",
            mode,
            len(samples),
            f", then exporting it to {onnx} and validating it with onnxruntime" if export else "",
        )
        start = time.perf_counter()
        out = compress(
            teacher,
            student,
            samples,
            mode=mode,
            num_samples=num_samples,
            onnx=onnx if export else None,
            seed=seed,
            progress=progress,
        )
        result.seconds[mode] = time.perf_counter() - start
        log.info("measuring the %s-recovered student's accuracy", mode)
        result.recovered[mode] = accuracy(out.model, x_test, y_test)
        result.results[mode] = out
        result.compress_result = out
    result.recovered_macs = count_macs(result.compress_result.model, samples[:1])
    return result
