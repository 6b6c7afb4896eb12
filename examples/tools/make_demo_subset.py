"""Write the small Fashion-MNIST subset that ships with fxkd for `fxkd demo`.

    python -m examples.tools.make_demo_subset

1,000 training images (the pool the demo draws its unlabelled samples from) and 2,000 test
images with labels (for accuracy when the full test set is not on the machine), chosen with a
fixed seed, stored as uint8 in fxkd/assets/fashion_mnist_subset.npz. Fashion-MNIST is
(c) Zalando SE, MIT licence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fxkd.cli.datasets import load_fashion_mnist

OUT = Path(__file__).resolve().parents[2] / "fxkd" / "assets" / "fashion_mnist_subset.npz"


def main() -> None:
    g = torch.Generator().manual_seed(2020)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    tr = torch.randperm(len(xtr), generator=g)[:1000]
    te = torch.randperm(len(xte), generator=g)[:2000]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        train_images=xtr[tr].numpy(),
        train_labels=ytr[tr].numpy(),
        test_images=xte[te].numpy(),
        test_labels=yte[te].numpy(),
    )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
