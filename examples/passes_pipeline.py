"""fxkd's passes in torch.fx's own PassManager: the pipeline ``compress`` runs, step by step.

A torchvision ResNet-18 teacher (random init, 10 classes) is L1-pruned to half its filters by
``fxkd.students.prune``; the student is then traced, aligned, given adapters, calibrated from
128 unlabelled samples and folded by four ``PassBase`` passes, exactly as a toolchain of one's
own would run them. The result equals what ``fxkd.compress`` returns.

    python -m examples.passes_pipeline [--mode kernel|pointwise]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torchvision
from torch.fx.passes.infra.pass_manager import PassManager

import fxkd
from fxkd.align import align
from fxkd.capture import trace
from fxkd.passes import CalibrateAdapters, FoldAdapters, FoldBatchNorm, InsertAdapters
from fxkd.students import channel_maps_of, prune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["kernel", "pointwise"], default="kernel")
    args = p.parse_args()

    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10).eval()
    samples = torch.randn(128, 3, 32, 32)  # stand-ins for a few unlabelled images
    student = prune(teacher, 0.5, importance="l1", example_inputs=samples[:2])
    config = fxkd.CompressConfig(num_samples=len(samples), mode=args.mode, progress=False)

    example = samples[:2]  # shapes only: ShapeProp annotates every node
    teacher_gm = trace(teacher, example)
    student_gm = trace(copy.deepcopy(student), example)
    alignment = align(teacher_gm, student_gm, channel_maps=channel_maps_of(student))
    print(f"{len(alignment.pairs)} aligned pairs ({alignment.strategy} alignment)")

    manager = PassManager(
        passes=[
            InsertAdapters(alignment, config.mode),  # identity adapters after each site
            CalibrateAdapters(teacher_gm, samples, config),  # closed form, block by block
            FoldAdapters(),  # Q·W into each producer: shapes unchanged
            FoldBatchNorm(),  # the deployment form: BatchNorms fused into their convs
        ],
        run_checks_after_each_pass=True,
    )
    recovered = manager(student_gm).graph_module

    via_compress = fxkd.compress(teacher, student, samples, config=config).model
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        t, s, r, c = teacher(x), student(x), recovered(x), via_compress(x)
    rel = lambda y: float((y - t).norm() / t.norm())  # noqa: E731
    print(f"held-out logit error vs teacher: student {rel(s):.4f} -> recovered {rel(r):.4f}")
    print(f"largest difference from fxkd.compress's model: {float((r - c).abs().max()):.2e}")
    params = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731
    print(f"parameters: teacher {params(teacher)}, student {params(student)}, recovered "
          f"{params(recovered)} (its BatchNorms fused into the convs)")  # fmt: skip


if __name__ == "__main__":
    main()
