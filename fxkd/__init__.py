"""fxkd: Few-Sample Knowledge Distillation (Li et al., CVPR 2020) as torch.fx compiler passes.

result = fxkd.compress(teacher, student, loader)   # few unlabelled samples, closed form
"""

from fxkd import passes
from fxkd.api import CompressResult, compress
from fxkd.config import CompressConfig
from fxkd.errors import (
    AlignmentError,
    CalibrationError,
    ConfigError,
    DataError,
    EmptyLoaderError,
    FxkdError,
    MemoryBudgetError,
    OnnxValidationError,
    TraceError,
)
from fxkd.polish import polish  # the function: ``fxkd.polish(...)`` as the README shows

__version__ = "0.1.0"

__all__ = [
    "AlignmentError",
    "CalibrationError",
    "CompressConfig",
    "CompressResult",
    "ConfigError",
    "DataError",
    "EmptyLoaderError",
    "FxkdError",
    "MemoryBudgetError",
    "OnnxValidationError",
    "TraceError",
    "compress",
    "passes",
    "polish",
]
