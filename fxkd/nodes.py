"""Node classification shared by alignment and the passes: producers, BatchNorms, adds,
nonlinearities, and the per-channel linear steps a site is seen through. Pure functions of
(GraphModule, Node)."""

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
    "attr_tensor",
    "channel_step",
    "clamp_bounds",
    "eval_batchnorm",
    "in_place_operand",
    "is_elementwise_nonlinearity",
    "is_identity",
    "is_nonlinearity",
    "is_per_channel",
    "module_call_counts",
    "redo_steps",
    "site_producer",
    "spatial_dims",
    "undo_steps",
]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
AFFINE_TYPES = (*CONV_TYPES, nn.Linear)
BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
PER_CHANNEL_MODULES = (
    *BATCHNORM_TYPES,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.Dropout,
    nn.Identity,
)
"""Modules that act on each channel on its own (pooling over positions included)."""
PER_CHANNEL_FUNCTIONS = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.avg_pool2d,
    F.max_pool2d,
    F.dropout,
}

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
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_PERMUTE_FUNCTIONS = {torch.permute}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def only_user(node: fx.Node) -> fx.Node | None:
    """The one node that uses ``node``, or None when it has none or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def affine_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The Conv1d/2d/3d or Linear a node calls, if it calls one (plain, zero padding)."""
    m = _module(gm, node)
    if isinstance(m, AFFINE_TYPES):
        return m
    return None


def site_producer(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, str, fx.Node] | None:
    """The affine module whose output ``node`` is, its qualified name, and the call_module node
    whose call count decides whether an adapter can be folded into it: a Conv/Linear call, or
    ``mha(...)[0]``, the output of an nn.MultiheadAttention (a torch.fx leaf), made by its
    ``out_proj``. None for anything else."""
    module = affine_module(gm, node)
    if module is not None:
        return module, str(node.target), node
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        source = node.args[0]
        mha = _module(gm, source) if isinstance(source, fx.Node) else None
        if isinstance(mha, nn.MultiheadAttention):
            return mha.out_proj, f"{source.target}.out_proj", source
    return None


def spatial_dims(module: nn.Module) -> int:
    """0 for Linear (channels last), else the conv's number of spatial dimensions."""
    if isinstance(module, nn.Linear):
        return 0
    return {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(module)]


def eval_batchnorm(gm: fx.GraphModule, node: fx.Node, dims: int) -> nn.Module | None:
    """The BatchNorm a node calls when, in eval mode, it is a per-channel affine map that matches
    a producer with ``dims`` spatial dimensions (running statistics tracked; after a Linear,
    only on a 2-D value, where BatchNorm1d's dim 1 is the Linear's features)."""
    m = _module(gm, node)
    expected = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    if type(m) is not expected or not m.track_running_stats or m.running_mean is None:
        return None
    if dims == 0 and node.args and isinstance(node.args[0], fx.Node):
        # BatchNorm1d normalizes dim 1: after a Linear that is the Linear's features only on a
        # (N, C) value; on (N, L, C) it would be L, not a per-channel map of the Linear
        shape = getattr(node.args[0].meta.get("tensor_meta"), "shape", None)
        if shape is not None and len(shape) != 2:
            return None
    return m


def is_nonlinearity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a node applies an elementwise nonlinearity (activation) to its input."""
    if node.op == "call_module":
        return isinstance(_module(gm, node), _NONLINEAR_MODULES)
    if node.op == "call_function":
        return node.target in _NONLINEAR_FUNCTIONS
    if node.op == "call_method":
        return node.target in _NONLINEAR_METHODS
    return False


_MIXING_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU)
_MIXING_FUNCTIONS = {F.softmax, F.log_softmax, F.glu, torch.softmax, torch.log_softmax}
_MIXING_METHODS = {"softmax", "log_softmax"}


def is_elementwise_nonlinearity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A nonlinearity applied to each value alone: not softmax or GLU, which mix the values
    along a dimension (channels, typically), so a pruned channel would change the others."""
    if not is_nonlinearity(gm, node):
        return False
    if node.op == "call_module":
        return not isinstance(_module(gm, node), _MIXING_MODULES)
    if node.op == "call_function":
        return node.target not in _MIXING_FUNCTIONS
    return node.target not in _MIXING_METHODS


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


def in_place_operand(node: fx.Node) -> fx.Node | None:
    """The operand ``a`` that an ``a + b`` node may be computed into when ``a`` dies there
    (not an input or a parameter, not both operands), else None."""
    ops = add_operands(node)
    if ops is None or ops[0] is ops[1] or ops[0].op in ("placeholder", "get_attr"):
        return None
    return ops[0]


def module_call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many call_module nodes call each module (a module called twice cannot be folded)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def _eval_drop(node: fx.Node) -> bool:
    """A functional dropout / stochastic depth (torchvision's, kept as a call by torch.fx)
    called with ``training=False``: the identity."""
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    if node.target is F.dropout:
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    elif name == "stochastic_depth":
        training = node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)
    else:
        return False
    return training is False


def is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An identity in eval: Identity/Dropout modules, functional dropout or stochastic depth
    called with ``training=False``."""
    if node.op == "call_module":
        return isinstance(_module(gm, node), _IDENTITY_MODULES)
    return _eval_drop(node)


def is_per_channel(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A step that maps each channel on its own, so channel c stays channel c: BatchNorm,
    pooling, an elementwise nonlinearity, an identity."""
    if isinstance(_module(gm, node), PER_CHANNEL_MODULES):
        return True
    if node.op == "call_function" and node.target in PER_CHANNEL_FUNCTIONS:
        return True
    return is_elementwise_nonlinearity(gm, node) or is_identity(gm, node)


def _permutation(node: fx.Node) -> tuple[int, ...] | None:
    if node.op == "call_function" and node.target in _PERMUTE_FUNCTIONS:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    elif node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
    else:
        return None
    if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
        return tuple(dims)
    return None


def attr_tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor behind a get_attr node (a parameter or buffer), else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


def channel_step(
    gm: fx.GraphModule, node: fx.Node, x: fx.Node, channel_dim: int, ndim: int
) -> tuple[str, int] | None:
    """Whether ``node`` applies to ``x`` (channels at ``channel_dim`` of ``ndim``) a map that is
    linear per channel and invertible, and so can be seen through between a site and its point:
    identity modules (Identity, Dropout in eval), functional dropout / stochastic depth with
    ``training=False``, a permutation of the axes, or a product with a
    constant (parameter/buffer) that varies along the channel axis only (layer scale), nowhere
    zero. Returns (kind, channel dim after the step) or None."""
    if node.op == "call_module" and isinstance(_module(gm, node), _IDENTITY_MODULES):
        return ("identity", channel_dim) if node.args[0] is x else None
    if _eval_drop(node) and node.args[0] is x:
        return "identity", channel_dim
    perm = _permutation(node)
    if perm is not None and node.args[0] is x and sorted(perm) == list(range(ndim)):
        return "permute", [p % ndim for p in perm].index(channel_dim % ndim)
    if node.op == "call_function" and node.target in _MUL_FUNCTIONS and len(node.args) == 2:
        a, b = node.args
        other = b if a is x else a if b is x else None
        scale = attr_tensor(gm, other)
        if scale is None or scale.dim() > ndim:
            return None
        shape = [1] * (ndim - scale.dim()) + list(scale.shape)
        c = channel_dim % ndim
        if any(n != 1 for i, n in enumerate(shape) if i != c):
            return None
        if not bool((scale != 0).all()):
            return None
        return "scale", channel_dim
    return None


def _scale_of(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    if node.op == "call_function" and node.target in _MUL_FUNCTIONS:
        return next((t for t in (attr_tensor(gm, a) for a in node.args) if t is not None), None)
    return None


def redo_steps(gm: fx.GraphModule, steps: list[fx.Node], value: torch.Tensor) -> torch.Tensor:
    """Apply seen-through ``steps`` (in order) to a value at their start."""
    for node in steps:
        perm, scale = _permutation(node), _scale_of(gm, node)
        if perm is not None:
            value = value.permute(*perm)
        elif scale is not None:
            value = value * scale.to(value)
    return value


def undo_steps(gm: fx.GraphModule, steps: list[fx.Node], value: torch.Tensor) -> torch.Tensor:
    """Map a value at the end of ``steps`` back to their start: inverse permutations, division
    by the (nowhere zero) scales, identities skipped."""
    for node in reversed(steps):
        perm, scale = _permutation(node), _scale_of(gm, node)
        if perm is not None:
            inverse = [0] * len(perm)
            for i, p in enumerate(perm):
                inverse[p % len(perm)] = i
            value = value.permute(*inverse)
        elif scale is not None:
            value = value / scale.to(value)
    return value


def _clamp_of(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """(lo, hi) of a clamp-like nonlinearity ``min(max(z, lo), hi)``, None for any other op."""
    inf = float("inf")
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if type(m) is nn.ReLU:
            return 0.0, inf
        if isinstance(m, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
            return float(m.min_val), float(m.max_val)
        return None
    if node.op == "call_function" and node.target in (F.relu, torch.relu, torch.relu_):
        return 0.0, inf
    if node.op == "call_function" and node.target is F.relu6:
        return 0.0, 6.0
    if node.op == "call_function" and node.target is F.hardtanh:
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return (float(lo), float(hi)) if all(isinstance(v, int | float) for v in (lo, hi)) else None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return 0.0, inf
    return None


def clamp_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """(lo, hi) when every reader of ``node`` applies the same clamp-like nonlinearity to it
    (ReLU, ReLU6, hardtanh) as its input: then only the clamped value of ``node`` is seen
    downstream. None when any reader sees the value itself (a skip connection, an output)."""
    users = list(node.users)
    bounds = {_clamp_of(gm, u) if u.args and u.args[0] is node else None for u in users}
    if not users or len(bounds) != 1 or None in bounds:
        return None
    return bounds.pop()
