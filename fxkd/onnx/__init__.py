"""ONNX export, onnxruntime validation and the ONNX-level adapter folding rules."""

from fxkd.onnx.export import (
    ValidationReport,
    export_onnx,
    export_onnx_counted,
    exported_elements,
    initializer_elements,
    tolerance_excess,
    validate_onnx,
)
from fxkd.onnx.rules import fold_adapters, fold_rules

__all__ = [
    "ValidationReport",
    "export_onnx",
    "export_onnx_counted",
    "exported_elements",
    "fold_adapters",
    "fold_rules",
    "initializer_elements",
    "tolerance_excess",
    "validate_onnx",
]
