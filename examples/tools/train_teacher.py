"""Train a Fashion-MNIST teacher reproducibly and write its checkpoint and JSON card.

    python -m examples.tools.train_teacher --arch vgg --epochs 12
    python -m examples.tools.train_teacher --arch resnet --epochs 12

Seeded (torch, data order, augmentation), SGD + momentum, one-cycle learning rate, random
crop (pad 2) and horizontal flip. The checkpoint (state dict, fp32) and a card with the
architecture, command, epochs, test accuracy and sha256 go to --out (default fxkd/assets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fxkd.cli.datasets import load_fashion_mnist, normalize
from fxkd.cli.zoo import build

log = logging.getLogger("train_teacher")


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with 2-pixel zero padding and random horizontal flip, per sample."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=g)
    dy = torch.randint(0, 5, (n,), generator=g)
    idx = torch.arange(28)
    rows = (dy[:, None] + idx)[:, :, None].expand(n, 28, 28)
    cols = (dx[:, None] + idx)[:, None, :].expand(n, 28, 28)
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return correct / len(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=["vgg", "resnet"], required=True)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "fxkd" / "assets"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m examples.tools.train_teacher " + shlex.join(argv or sys.argv[1:])
    log.info("%s", command)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    xtr, ytr = load_fashion_mnist("train", args.data_dir)
    xte, yte = load_fashion_mnist("test", args.data_dir)
    xtr, xte = normalize(xtr), normalize(xte)
    model = build(args.arch)
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    steps = args.epochs * (len(xtr) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=g)
        for i in range(len(xtr) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(xtr[idx], g)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.info(
            "epoch %d/%d loss %.3f test acc %.4f (%.0fs)",
            epoch + 1,
            args.epochs,
            float(loss),
            accuracy(model, xte, yte),
            time.time() - start,
        )
    acc = accuracy(model, xte, yte)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"fashion_{args.arch}.pt"
    torch.save(model.state_dict(), ckpt)
    card = {
        "architecture": f"fxkd.cli.zoo.{type(model).__name__}",
        "arch": args.arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": command,
        "epochs": args.epochs,
        "seed": args.seed,
        "test_accuracy": round(acc, 4),
        "train_seconds": round(time.time() - start),
        "torch": torch.__version__,
        "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
    }
    (out / f"fashion_{args.arch}.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("wrote %s (test accuracy %.4f)", ckpt, acc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
