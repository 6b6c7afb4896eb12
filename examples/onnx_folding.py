"""Fold at the ONNX level: calibrate with the adapters in the graph, export, then fold in ONNX.

For pipelines that export first: ``InsertAdapters`` and ``CalibrateAdapters`` leave each solved
1×1 adapter in the student; the student is exported to ONNX with them, and
``fxkd.onnx.fold_adapters`` merges every adapter (and a BatchNorm between) into the Conv or Gemm
before it. The folded file has one Conv/Gemm fewer per adapter, and onnxruntime gives the same
outputs as the student folded by the fx pass.

    python -m examples.onnx_folding [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

import fxkd
from fxkd.align import align
from fxkd.capture import trace
from fxkd.onnx import export_onnx, fold_adapters
from fxkd.passes import CalibrateAdapters, InsertAdapters, KernelAdapter, PointwiseAdapter
from fxkd.students import channel_maps_of, prune


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="where the .onnx files go (temp)")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    teacher = torchvision.models.mobilenet_v2(num_classes=10).eval()
    samples = torch.randn(128, 3, 32, 32)
    student = prune(teacher, 0.5, importance="l1", example_inputs=samples[:2])
    config = fxkd.CompressConfig(num_samples=128, mode="pointwise", progress=False)

    teacher_gm = trace(teacher, samples[:2])
    student_gm = trace(copy.deepcopy(student), samples[:2])
    alignment = align(teacher_gm, student_gm, channel_maps=channel_maps_of(student))
    InsertAdapters(alignment, config.mode)(student_gm)
    CalibrateAdapters(teacher_gm, samples, config)(student_gm)

    with_adapters = export_onnx(student_gm.eval(), samples[:2], out / "with_adapters.onnx")
    folded = fold_adapters(onnx.load(with_adapters))
    onnx.checker.check_model(folded, full_check=True)
    onnx.save(folded, out / "student.onnx")

    def ops(model: onnx.ModelProto, *kinds: str) -> int:
        return sum(node.op_type in kinds for node in model.graph.node)

    before, after = onnx.load(with_adapters), folded
    adapters = sum(isinstance(m, (PointwiseAdapter, KernelAdapter)) for m in student_gm.modules())
    print(f"{adapters} adapters calibrated; Conv+Gemm nodes "
          f"{ops(before, 'Conv', 'Gemm')} -> {ops(after, 'Conv', 'Gemm')}")  # fmt: skip

    reference = fxkd.compress(teacher, student, samples, config=config).model
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32), np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    got = run(out / "student.onnx", x)
    print(f"onnxruntime, folded in ONNX vs folded by fxkd's pass: max abs diff "
          f"{float(np.abs(got - expected).max()):.2e}; files in {out}")  # fmt: skip


if __name__ == "__main__":
    main()
