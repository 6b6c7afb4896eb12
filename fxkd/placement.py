"""Where a module lives: its device and floating dtype, and inputs moved to match."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["module_device", "module_dtype", "to_module"]


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter (fp32 when it has none)."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def to_module(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` on the module's device, in its floating dtype."""
    return x.to(module_device(module), module_dtype(module))
