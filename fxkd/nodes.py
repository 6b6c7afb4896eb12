"""Node classification shared by alignment and the passes: producers, BatchNorms, adds,
nonlinearities. Pure functions of (GraphModule, Node)."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AFFINE_TYPES",
    "add_operands",
    "affine_module",
    "eval_batchnorm",
    "is_nonlinearity",
    "module_call_counts",
    "spatial_dims",
]

AFFINE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_NONLINEAR_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Hardtanh,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softsign,
    nn.Tanhshrink,
    nn.GLU,
)
_NONLINEAR_FUNCTIONS = {
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    F.softmax,
    F.log_softmax,
    F.glu,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    torch.softmax,
    torch.log_softmax,
    torch.nn.functional.sigmoid,
    torch.nn.functional.tanh,
}
_NONLINEAR_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "softmax",
    "log_softmax",
    "clamp",
}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def affine_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The Conv1d/2d/3d or Linear a node calls, if it calls one (plain, zero padding)."""
    m = _module(gm, node)
    if isinstance(m, AFFINE_TYPES):
        return m
    return None


def spatial_dims(module: nn.Module) -> int:
    """0 for Linear (channels last), else the conv's number of spatial dimensions."""
    if isinstance(module, nn.Linear):
        return 0
    return {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(module)]


def eval_batchnorm(gm: fx.GraphModule, node: fx.Node, dims: int) -> nn.Module | None:
    """The BatchNorm a node calls when, in eval mode, it is a per-channel affine map that matches
    a producer with ``dims`` spatial dimensions (running statistics tracked)."""
    m = _module(gm, node)
    expected = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    if type(m) is expected and m.track_running_stats and m.running_mean is not None:
        return m
    return None


def is_nonlinearity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a node applies an elementwise nonlinearity (activation) to its input."""
    if node.op == "call_module":
        return isinstance(_module(gm, node), _NONLINEAR_MODULES)
    if node.op == "call_function":
        return node.target in _NONLINEAR_FUNCTIONS
    if node.op == "call_method":
        return node.target in _NONLINEAR_METHODS
    return False


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of a plain ``a + b`` node (no alpha, no scalar), else None."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return a, b
    return None


def module_call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many call_module nodes call each module (a module called twice cannot be folded)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts
