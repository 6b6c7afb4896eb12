"""onnxruntime latency: the recovered student costs what the student as built costs.

    python -m examples.benchmarks.bench_onnx_latency [--model fashion-vgg|resnet18] [--batch 1 64]
                                          [--repeats 200] [--threads 2]

Four ONNX files of one pruned student, timed side by side in one run on the CPU provider
(graph optimisations on, the deployment setting):

- ``as built``: the L1-pruned student before recovery (the cost baseline);
- ``fxkd folded``: ``fxkd.compress(..., mode="pointwise")``'s result (adapters folded in fx);
- ``adapters unfolded``: the same calibrated student exported with its 1×1 adapters in place;
- ``onnx folded``: that file after ``fxkd.onnx.fold_adapters`` (folding at the ONNX level).

Timings are interleaved (one call of each model per round) so drift hits all alike; the table
gives the median latency and its ratio to ``as built``. The promise is ratio ≈ 1.00 for both
folded files; the unfolded file shows what folding saves.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import fxkd
from fxkd.align import align
from fxkd.capture import trace
from fxkd.onnx import export_onnx, fold_adapters
from fxkd.passes import CalibrateAdapters, InsertAdapters
from fxkd.students import channel_maps_of, prune


def models(name: str):
    """(teacher, input shape) for the benchmark."""
    if name == "fashion-vgg":
        from fxkd.cli.demo import load_teacher

        return load_teacher("vgg"), (1, 28, 28)
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=100).eval(), (3, 112, 112)


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, ["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["fashion-vgg", "resnet18"], default="fashion-vgg")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()

    teacher, shape = models(args.model)
    samples = torch.randn(args.samples, *shape)
    student = prune(teacher, 0.5, importance="l1", example_inputs=samples[:2])
    cfg = fxkd.CompressConfig(
        num_samples=args.samples,
        mode="pointwise",
        channel_maps=channel_maps_of(student),
        progress=False,
    )
    folded = fxkd.compress(teacher, student, samples, config=cfg).model

    teacher_gm = trace(teacher, samples[:8])
    unfolded = trace(copy.deepcopy(student), samples[:8])
    InsertAdapters(align(teacher_gm, unfolded, channel_maps=cfg.channel_maps), "pointwise")(
        unfolded
    )
    CalibrateAdapters(teacher_gm, samples, cfg)(unfolded)

    out = Path(tempfile.mkdtemp(prefix="fxkd-latency-"))
    files = {}
    for label, model in (
        ("as built", student),
        ("fxkd folded", folded),
        ("adapters unfolded", unfolded),
    ):
        files[label] = export_onnx(model, samples[:2], out / f"{label.replace(' ', '_')}.onnx")
    onnx_folded = fold_adapters(onnx.load(files["adapters unfolded"]))
    files["onnx folded"] = out / "onnx_folded.onnx"
    onnx.save(onnx_folded, files["onnx folded"])

    sessions = {k: session(p, args.threads) for k, p in files.items()}
    nodes = {k: len(onnx.load(p).graph.node) for k, p in files.items()}
    print(
        f"onnxruntime {ort.__version__} CPU, {args.threads} threads, model {args.model} "
        f"(L1-pruned 50%), median of {args.repeats} interleaved calls"
    )
    for batch in args.batch:
        x = np.random.default_rng(0).standard_normal((batch, *shape), np.float32)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():  # warm-up
            s.run(None, {s.get_inputs()[0].name: x})
        for _ in range(args.repeats):
            for k, s in sessions.items():
                feed = {s.get_inputs()[0].name: x}
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["as built"])
        print(f"\nbatch {batch}")
        print(f"{'file':<20}{'ONNX nodes':>11}{'median ms':>11}{'ratio':>8}")
        for k, ts in times.items():
            med = statistics.median(ts)
            print(f"{k:<20}{nodes[k]:>11}{med * 1e3:>11.3f}{med / base:>8.2f}")


if __name__ == "__main__":
    main()
