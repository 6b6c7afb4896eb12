"""What a model costs to run: multiply-accumulates per sample, counted by torch's FLOP counter.

``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of the matrix ops a forward
dispatches (convolutions, linear layers, matmuls): 2 per multiply-accumulate. Elementwise ops,
BatchNorm and pooling are not counted, which is the usual MAC convention.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs"]


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``model`` per sample of ``example``."""
    flag = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(flag)
    return counter.get_total_flops() // 2 // max(1, len(example))
