"""fxkd's torch.fx passes: each a ``PassBase`` that mutates a GraphModule in place.

InsertAdapters(alignment, mode) ─▶ CalibrateAdapters(teacher, samples, config)
    ─▶ FoldAdapters() ─▶ [FoldBatchNorm()]
"""

from .adapter import KernelAdapter, PointwiseAdapter
from .base import FxkdPass
from .calibrate import CalibrateAdapters, SiteRecord
from .fold import FoldAdapters, FoldBatchNorm
from .insert import InsertAdapters
from .runner import GraphRunner

__all__ = [
    "CalibrateAdapters",
    "FoldAdapters",
    "FoldBatchNorm",
    "FxkdPass",
    "GraphRunner",
    "InsertAdapters",
    "KernelAdapter",
    "PointwiseAdapter",
    "SiteRecord",
]
