"""Where a module lives: its device and floating dtype, inputs moved to match, and the
numerics calibration runs under (full fp32 precision: no TF32)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fxkd.inputs import Inputs, moved

__all__ = ["full_precision", "module_device", "module_dtype", "to_module"]


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """No TF32 in matmuls and cuDNN convolutions for the block (TF32 keeps 10 mantissa bits:
    1e-3 relative noise in the Gram and in the parity check); the caller's settings are
    restored afterwards. A no-op on CPU, where fp32 is always full precision."""
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter (fp32 when it has none)."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def to_module(x: torch.Tensor | Inputs, module: nn.Module) -> torch.Tensor | Inputs:
    """``x`` on the module's device; floating inputs in its floating dtype (token ids and
    masks keep theirs)."""
    if isinstance(x, Inputs):
        return x.to(module_device(module), module_dtype(module))
    return moved(x, module_device(module), module_dtype(module))
