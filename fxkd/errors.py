"""Typed errors. Every error fxkd raises on purpose derives from :class:`FxkdError`.

Messages name the argument or graph node at fault and end with a hint on what to do.
"""

from __future__ import annotations

__all__ = [
    "AlignmentError",
    "CalibrationError",
    "ConfigError",
    "DataError",
    "EmptyLoaderError",
    "FxkdError",
    "MemoryBudgetError",
    "OnnxValidationError",
    "TraceError",
]


class FxkdError(Exception):
    """Base class of every error fxkd raises on purpose."""


class ConfigError(FxkdError, ValueError):
    """A configuration value (or a keyword given to ``compress``) is invalid."""


class TraceError(FxkdError):
    """No front-end could capture a model (data-dependent control flow, unsupported calls, ...)
    or the captured graph does not run on the samples. ``attempts``: each front-end tried and
    why it failed."""

    def __init__(self, message: str, attempts: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.attempts = dict(attempts or {})


class AlignmentError(FxkdError):
    """Teacher and student share no block boundary that fxkd can pair up."""


class DataError(FxkdError):
    """The sample loader yields something fxkd cannot use."""


class EmptyLoaderError(DataError):
    """The sample loader yielded no samples at all."""


class CalibrationError(FxkdError):
    """Calibration met values it cannot solve with (NaN/Inf features, mismatched shapes)."""


class MemoryBudgetError(CalibrationError):
    """A calibration's memory estimate exceeds what its device has free (or ``memory_limit``);
    raised before any work starts, naming the options that would make it fit."""


class OnnxValidationError(FxkdError):
    """Export or onnxruntime validation failed in a way that is not a numerical mismatch."""
