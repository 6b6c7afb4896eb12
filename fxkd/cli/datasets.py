"""Fashion-MNIST without a download where the machine has it: IDX files read with numpy.

Looks in ``data_dir``, then ``$FXKD_DATA``, then ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist``); elsewhere torchvision's ``FashionMNIST`` downloads it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["MEAN", "STD", "find_fashion_mnist", "load_fashion_mnist", "normalize"]

MEAN, STD = 0.2860, 0.3530
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (
        directory / stem,
        directory / f"{stem}.gz",
        directory / "FashionMNIST" / "raw" / stem,
    ):
        if candidate.exists():
            return candidate
    return None


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first directory holding the four IDX files, or None."""
    dirs = [Path(d) for d in (data_dir, os.environ.get("FXKD_DATA"), DEBIAN_DIR) if d]
    for d in dirs:
        if all(_find(d, stem) for pair in _FILES.values() for stem in pair):
            return d
    return None


def load_fashion_mnist(
    split: str, data_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of ``split`` ("train" or "test")."""
    found = find_fashion_mnist(data_dir)
    if found is None:
        from torchvision.datasets import FashionMNIST

        root = Path(data_dir or os.environ.get("FXKD_DATA") or Path.home() / ".cache" / "fxkd")
        ds = FashionMNIST(str(root), train=split == "train", download=True)
        return ds.data.clone(), ds.targets.clone()
    images, labels = (_read_idx(_find(found, stem)) for stem in _FILES[split])
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), standardised with the training set's stats."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)
