"""Loading what the command line names: models (saved modules or factories) and sample data."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fxkd.errors import ConfigError, DataError

__all__ = ["load_data", "load_model"]


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """A model from ``spec``: a file written by ``torch.save(module)``, or a
    ``package.module:callable`` factory; ``weights`` (a state dict file) is loaded into it."""
    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot import {spec!r}: {exc}") from exc
        model = factory()
    elif Path(spec).exists():
        model = torch.load(spec, map_location="cpu", weights_only=False)
        if isinstance(model, dict):
            raise ConfigError(
                f"{spec} holds a state dict, not a module; pass the architecture "
                "as package.module:callable and the file as --*-weights"
            )
    else:
        raise ConfigError(f"{spec!r} is neither a file nor a package.module:callable factory")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"weights {weights} do not fit {spec}: {exc}") from exc
    return model.eval()


def load_data(spec: str, *, data_dir: str | None = None, image_size: int | None = None):
    """Samples from ``spec``: ``fashion-mnist`` (training split, normalised), a ``.pt`` or
    ``.npy`` tensor file (samples along dim 0), or an image folder (torchvision ImageFolder)."""
    path = Path(spec)
    if spec == "fashion-mnist":
        from fxkd.cli.datasets import load_fashion_mnist, normalize

        images, _ = load_fashion_mnist("train", data_dir)
        return normalize(images)
    if path.suffix == ".pt" and path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, torch.Tensor):
            raise DataError(f"{spec} holds a {type(data).__name__}, not a tensor of samples")
        return data.float()
    if path.suffix == ".npy" and path.is_file():
        return torch.from_numpy(np.load(path)).float()
    if path.is_dir():
        try:
            from torchvision import datasets, transforms
        except ImportError as exc:
            raise DataError(
                "reading an image folder needs torchvision (pip install torchvision)"
            ) from exc
        steps = [transforms.Resize((image_size, image_size))] if image_size else []
        dataset = datasets.ImageFolder(
            str(path), transforms.Compose([*steps, transforms.ToTensor()])
        )
        return torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
    raise DataError(f"--data {spec!r}: not 'fashion-mnist', a .pt/.npy file or an image folder")
