"""The ceiling: fine-tune a compressed student on all 55,000 labelled training images.

    python -m examples.benchmarks.full_finetune --teacher vgg --students l1-50 l1-75 --epochs 3

The students are the benchmark's (fashion_mnist.py make_students, same ratios), trained
with SGD + momentum, cosine learning rate, the teacher script's augmentation (random crop pad 2,
horizontal flip), BatchNorm in training mode, seeded. The last 5,000 training images are held
out as in the benchmark; accuracy is on the full 10,000-image test set. Results are *stored*
(results/full_finetune.json, with the command): the few-sample benchmark reads them as
its "full fine-tune" row and says so, it does not recompute them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from examples.benchmarks.fashion_mnist import RESULTS, make_students
from fxkd.cli.datasets import load_fashion_mnist, normalize
from fxkd.cli.demo import accuracy, load_teacher

log = logging.getLogger("full_finetune")


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (pad 2) and horizontal flip, per image."""
    n = len(x)
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = (torch.randint(0, 5, (n,), generator=g) for _ in range(2))
    rows = (dy[:, None] + torch.arange(28)[None]).clamp(max=31)
    cols = (dx[:, None] + torch.arange(28)[None]).clamp(max=31)
    out = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def finetune(student, x, y, epochs, lr, batch, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = student
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(len(x) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.info("epoch %d/%d loss %.3f", epoch + 1, epochs, float(loss.detach()))
    return model.eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", default="vgg")
    p.add_argument("--students", nargs="+", default=["l1-50", "l1-75"])
    p.add_argument("--ratios", nargs=2, type=float, default=[0.5, 0.75])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS / "full_finetune.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m examples.benchmarks.full_finetune " + " ".join(sys.argv[1:])
    xtr, ytr = load_fashion_mnist("train", args.data_dir)
    xte, yte = load_fashion_mnist("test", args.data_dir)
    xtr, xte = normalize(xtr)[:-5000], normalize(xte)
    ytr = ytr[:-5000]
    teacher = load_teacher(args.teacher)
    students = make_students(teacher, xtr[:1], tuple(args.ratios))
    out = Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {}
    for name in args.students:
        start = time.perf_counter()
        model = finetune(students[name], xtr, ytr, args.epochs, args.lr, args.batch, args.seed)
        acc = accuracy(model, xte, yte)
        seconds = time.perf_counter() - start
        log.info("%s %s: test accuracy %.4f (%.0fs)", args.teacher, name, acc, seconds)
        stored[f"{args.teacher}/{name}"] = {
            "acc": acc,
            "seconds": round(seconds),
            "epochs": args.epochs,
            "command": command,
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stored, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
