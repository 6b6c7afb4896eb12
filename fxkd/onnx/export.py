"""ONNX export and numerical validation with onnxruntime.

``export_onnx`` uses torch's dynamo-based exporter with the batch dimension dynamic, weights
inside the file. ``validate_onnx`` checks the file (``onnx.checker``, full check), runs it with
onnxruntime (CPU provider; CUDA too when onnxruntime-gpu and a GPU are present) and compares
every output with PyTorch, and counts initializer elements so "same size" is checked.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fxkd.capture import eval_mode
from fxkd.capture.export import dynamic_batch
from fxkd.errors import OnnxValidationError
from fxkd.inputs import Inputs
from fxkd.onnx.rules import fold_adapters
from fxkd.placement import full_precision

__all__ = [
    "ValidationReport",
    "export_onnx",
    "export_onnx_counted",
    "exported_elements",
    "fold_adapters",
    "initializer_elements",
    "validate_onnx",
]

log = logging.getLogger(__name__)


@dataclass
class ValidationReport:
    """onnxruntime vs PyTorch on real inputs.

    Every provider runs twice: with onnxruntime's graph optimisations at their default (all) and
    with them disabled, so a fusion bug and an export bug are told apart (``per_provider``).
    max_abs: max |ort − torch| over outputs, providers and both runs; max_rel: max_abs of each
    output divided by that output's max |torch|; passed: every element within
    ``atol·max(1, scale) + rtol·|torch|`` in every run, scale the output's max |torch| (fp32
    rounding through a network grows with the size of its values: on logits of scale 66 a fixed
    1e-4 is 13 ulps, which a near-zero logit exceeds by chance); worst: the element furthest
    outside its bound when failed, else the largest difference; initializer_elements: weights
    in the (optimised) file.
    The "same size" check compares structure, not values: ``weight_elements`` and
    ``reference_elements`` count the initializers of *unoptimised* exports of the validated
    model and of the reference (the student as given). Optimised files are not compared: the
    exporter's optimiser fuses BatchNorms and drops all-zero biases, which depends on values.
    """

    passed: bool
    max_abs: float
    max_rel: float
    providers: list[str]
    initializer_elements: int
    weight_elements: int | None = None
    reference_elements: int | None = None
    worst: str = ""
    per_provider: dict[str, float] = field(default_factory=dict)

    @property
    def same_size(self) -> bool | None:
        if self.reference_elements is None or self.weight_elements is None:
            return None
        return self.weight_elements == self.reference_elements

    def __str__(self) -> str:
        size = ""
        if self.reference_elements is not None:
            size = (
                f", weights {self.weight_elements} vs student as given "
                f"{self.reference_elements} ({'same' if self.same_size else 'DIFFERENT'})"
            )
        verdict = "passed" if self.passed else f"FAILED (worst: {self.worst})"
        return (
            f"ONNX validation {verdict}: max abs {self.max_abs:.3g}, max rel "
            f"{self.max_rel:.3g} on {', '.join(self.providers)}{size}"
        )


def export_onnx(
    model: nn.Module,
    example: torch.Tensor | Inputs,
    path: str | os.PathLike,
    *,
    optimize: bool = True,
) -> Path:
    """Export ``model`` (eval mode, batch dimension dynamic) to one self-contained .onnx file,
    through torch's optimiser unless ``optimize=False``."""
    return _saved(_exported(model, example, optimize), path)


def export_onnx_counted(
    model: nn.Module, example: torch.Tensor | Inputs, path: str | os.PathLike
) -> tuple[Path, int]:
    """``export_onnx``'s optimised file and ``exported_elements`` of the same model from one
    export: the unoptimised program's initializers are counted, then it is optimised and saved
    (what ``torch.onnx.export(optimize=True)`` does after exporting)."""
    program = _exported(model, example, optimize=False)
    elements = initializer_elements(program.model_proto)
    program.optimize()
    return _saved(program, path), elements


def _exported(model: nn.Module, example: torch.Tensor | Inputs, optimize: bool):
    """torch's dynamo-based export of ``model`` as an ``ONNXProgram`` (nothing written)."""
    example = Inputs.of(example)
    try:
        with torch.no_grad(), eval_mode(model):
            return torch.onnx.export(
                model,
                example.args,
                kwargs=example.kwargs or None,
                dynamo=True,
                dynamic_shapes=dynamic_batch(model, example, "batch"),
                optimize=optimize,
                verbose=False,
            )
    except Exception as exc:
        raise OnnxValidationError(
            f"torch.onnx.export failed for {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc


def _saved(program, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
    return path


def initializer_elements(model_or_path: onnx.ModelProto | str | os.PathLike) -> int:
    """Total element count of an ONNX model's initializers (its weights)."""
    proto = (
        model_or_path
        if isinstance(model_or_path, onnx.ModelProto)
        else onnx.load(str(model_or_path))
    )
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


def exported_elements(model: nn.Module, example: torch.Tensor | Inputs) -> int:
    """Initializer elements of an unoptimised export of ``model`` (its weights, by structure)."""
    return initializer_elements(_exported(model, example, optimize=False).model_proto)


def _feed(session, inputs: Inputs, path) -> dict[str, np.ndarray]:
    """onnxruntime's input feed: the file's inputs are the model's input tensors, in order."""
    names = [i.name for i in session.get_inputs()]
    leaves = inputs.leaves()
    if len(names) != len(leaves):
        raise OnnxValidationError(
            f"{path} takes inputs {names}, the samples hold {inputs.describe()}"
        )
    return {n: t.detach().cpu().numpy() for n, t in zip(names, leaves, strict=True)}


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def tolerance_excess(diff: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """Each element's |ort − torch| over its bound ``atol·max(1, scale) + rtol·|torch|`` (scale:
    the output's max |torch|); within the tolerance where ≤ 1."""
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return diff / (atol * max(1.0, scale) + rtol * np.abs(ref))


def validate_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    inputs: torch.Tensor | Inputs,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    weight_elements: int | None = None,
    reference_elements: int | None = None,
) -> ValidationReport:
    """Check the file and compare onnxruntime with ``model`` on ``inputs`` (eval mode; the inputs
    in the dtype the model was exported with)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise OnnxValidationError(
            "onnxruntime is not installed. Hint: pip install 'fxkd[ort]' (or 'fxkd[gpu]')."
        ) from exc
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise OnnxValidationError(f"onnx.checker rejected {path}: {exc}") from exc
    inputs = Inputs.of(inputs)
    with torch.no_grad(), eval_mode(model), full_precision():
        expected = inputs.call(model)
    # every tensor leaf of whatever the model returns (tuples, dicts, NamedTuples, ...), in
    # the pytree order the exporter flattens them in
    expected = [e for e in tree_flatten(expected)[0] if isinstance(e, torch.Tensor)]
    expected = [e.detach().double().cpu().numpy() for e in expected]
    providers = _providers()
    max_abs = max_rel = 0.0
    passed, worst, per_provider = True, "", {}
    levels = {
        "optimized": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "unoptimized": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    for provider, (level_name, level) in itertools.product(providers, levels.items()):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=[provider])
        run = f"{provider} ({level_name})"
        feed = _feed(session, inputs, path)
        outputs = session.run(None, feed)
        if len(outputs) != len(expected):
            raise OnnxValidationError(
                f"{path} has {len(outputs)} outputs, the model returns {len(expected)}"
            )
        worst_here = 0.0
        for meta, got, ref in zip(session.get_outputs(), outputs, expected, strict=True):
            diff = np.abs(got.astype(np.float64) - ref)
            scale = float(np.abs(ref).max()) or 1.0
            excess = tolerance_excess(diff, ref, atol, rtol)
            ok = bool(np.all(excess <= 1.0))
            worst_here = max(worst_here, float(diff.max()))
            if (passed and not ok) or (passed and float(diff.max()) >= max_abs):
                at = excess if not ok else diff  # the first failure, else the largest diff
                idx = np.unravel_index(int(at.argmax()), diff.shape)
                worst = (
                    f"{run} output {meta.name}[{', '.join(map(str, idx))}]: ort "
                    f"{got[idx]:.6g} vs torch {ref[idx]:.6g}"
                )
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(diff.max()) / scale)
            passed &= ok
        per_provider[run] = worst_here
    report = ValidationReport(
        passed,
        max_abs,
        max_rel,
        providers,
        initializer_elements(path),
        weight_elements,
        reference_elements,
        worst,
        per_provider,
    )
    log.info("%s", report)
    return report
