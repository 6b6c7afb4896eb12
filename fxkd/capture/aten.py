"""Normalise an aten-level graph (``torch.export``) into the torch-level form the passes read.

An exported graph calls ``aten.conv2d(x, w, b, ...)`` on weights it fetches with ``get_attr``,
and spells every step as an aten overload. Two rewrites, each exact (same ops dispatched):

1. **Modules back**: a conv/linear/BatchNorm call whose weights are the whole state of one
   owner module (``layer1.0.conv1`` holding ``weight`` and ``bias``) becomes a ``call_module``
   of an ``nn.Conv*d`` / ``nn.Linear`` / ``nn.BatchNorm*d`` put at the owner's name, sharing
   its Parameters and buffers. Sites, folding and pruning then name the layers the user knows,
   and folding writes solved weights into the tensors the graph holds.
2. **Torch-level targets**: an aten overload whose torch function takes the same arguments
   (``aten.relu.default`` → ``torch.relu``, ``aten.max_pool2d.default`` → ``F.max_pool2d``,
   ``aten.view.default`` → ``Tensor.view``, ...) is replaced by it, so node classification
   (``fxkd.nodes``) answers for both front-ends with one set of rules.

Anything else (attention, layer norm's weights, embeddings) stays as exported: an opaque step,
as it is in a symbolically traced graph.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxkd.nodes import attr_tensor

__all__ = ["normalise_aten"]

aten = torch.ops.aten

_SAME_ARGUMENTS: dict[Any, Any] = {
    aten.relu.default: torch.relu,
    aten.relu_.default: torch.relu_,
    aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div,
    aten.gelu.default: F.gelu,
    aten.silu.default: F.silu,
    aten.hardswish.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid,
    aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh,
    aten.hardtanh.default: F.hardtanh,
    aten.hardtanh_.default: F.hardtanh_,
    aten.leaky_relu.default: F.leaky_relu,
    aten.clamp.default: torch.clamp,
    aten.softmax.int: torch.softmax,
    aten.log_softmax.int: torch.log_softmax,
    aten.max_pool2d.default: F.max_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d,
    aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d.default: F.adaptive_avg_pool3d,
    aten.dropout.default: F.dropout,
    aten.flatten.using_ints: torch.flatten,
    aten.permute.default: torch.permute,
    aten.cat.default: torch.cat,
    aten.reshape.default: torch.reshape,
    aten.transpose.int: torch.transpose,
    aten.mean.dim: torch.mean,
    aten.matmul.default: torch.matmul,
    aten.unsqueeze.default: torch.unsqueeze,
    aten.squeeze.dim: torch.squeeze,
    aten.select.int: torch.select,
}
"""aten overloads and the torch functions that take the same positional and keyword
arguments (both dispatch to the overload)."""

_IN_PLACE: dict[Any, tuple[Any, int]] = {
    aten.silu_.default: (F.silu, 1),
    aten.hardswish_.default: (F.hardswish, 1),
    aten.hardsigmoid_.default: (F.hardsigmoid, 1),
    aten.dropout_.default: (F.dropout, 3),
}
"""In-place aten overloads: the torch function and the position of its ``inplace`` flag."""

_METHODS = {
    aten.view.default: "view",
    aten.contiguous.default: "contiguous",
    aten.expand.default: "expand",
}

_CONVS = {
    aten.conv1d.default: nn.Conv1d,
    aten.conv2d.default: nn.Conv2d,
    aten.conv3d.default: nn.Conv3d,
    aten.conv1d.padding: nn.Conv1d,
    aten.conv2d.padding: nn.Conv2d,
    aten.conv3d.padding: nn.Conv3d,
}
_BATCHNORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_LIFTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)
_BATCHNORM_STATE = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def normalise_aten(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place (see the module doc) and recompile it; returns it."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)  # the exported module's input guard: not a model step
            continue
        if node.op != "call_function":
            continue
        if node.target in _CONVS or node.target is aten.linear.default:
            _lift_affine(gm, node)
        elif node.target in (
            aten.batch_norm.default,
            aten._native_batch_norm_legit_no_training.default,
        ):
            _lift_batchnorm(gm, node)
        elif node.target in _SAME_ARGUMENTS:
            node.target = _SAME_ARGUMENTS[node.target]
        elif node.target in _IN_PLACE:
            fn, at = _IN_PLACE[node.target]
            values = list(_arguments(node).values())[:at]
            node.args = (*values, True)
            node.kwargs = {}
            node.target = fn
        elif node.target is aten.add_.Tensor and len(node.args) == 2 and not node.kwargs:
            node.target = operator.iadd
        elif node.target in _METHODS:
            node.op, node.target = "call_method", _METHODS[node.target]
        elif node.target is aten.layer_norm.default:
            node.target, node.args = F.layer_norm, tuple(node.args[:5])
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def _arguments(node: fx.Node) -> dict[str, Any]:
    """Every argument of an aten call by its schema name, defaults filled in."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def _owner(gm: fx.GraphModule, nodes: dict[str, Any], allowed: set[str]) -> str | None:
    """The module whose whole state the get_attr ``nodes`` (attribute name → node or None)
    are: each ``owner.<its attribute name>``, the owner holding nothing else and no children."""
    owners = set()
    for attr, node in nodes.items():
        if node is None:
            continue
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        owner, _, name = str(node.target).rpartition(".")
        if name != attr or not owner:
            return None
        owners.add(owner)
    if len(owners) != 1:
        return None
    owner = owners.pop()
    try:
        module = gm.get_submodule(owner)
    except AttributeError:
        return None
    if isinstance(module, _LIFTED):
        return owner  # lifted already (a module called twice)
    state = {n for n, _ in module.named_parameters(recurse=False)}
    state |= {n for n, _ in module.named_buffers(recurse=False)}
    if next(module.children(), None) is not None or not state <= allowed:
        return None
    return owner


def _install(gm: fx.GraphModule, owner: str, fresh: nn.Module, tensors: dict[str, Any]) -> bool:
    """Put ``fresh`` at ``owner`` holding the owner's tensors (shared, not copied), unless a
    module lifted there before holds other ones; whether it is there now."""
    current = gm.get_submodule(owner)
    if type(current) is type(fresh):
        return all(getattr(current, k) is v for k, v in tensors.items())
    old = dict(current.named_parameters(recurse=False)) | dict(current.named_buffers(recurse=False))
    for name in list(fresh._parameters):
        fresh._parameters[name] = old.get(name)
    for name in list(fresh._buffers):
        fresh._buffers[name] = old.get(name)
    fresh.train(current.training)
    gm.set_submodule(owner, fresh)
    return True


def _call_module(gm: fx.GraphModule, node: fx.Node, owner: str, x: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(owner, (x,))
    call.meta = dict(node.meta)
    return call


def _lift_affine(gm: fx.GraphModule, node: fx.Node) -> None:
    args = _arguments(node)
    weight, bias = args.get("weight"), args.get("bias")
    owner = _owner(gm, {"weight": weight, "bias": bias}, {"weight", "bias"})
    value = attr_tensor(gm, weight)
    if owner is None or value is None:
        return
    if node.target is aten.linear.default:
        fresh: nn.Module = nn.Linear(value.shape[1], value.shape[0], bias is not None, "meta")
    else:
        groups = int(args["groups"])
        fresh = _CONVS[node.target](
            value.shape[1] * groups,
            value.shape[0],
            tuple(value.shape[2:]),
            stride=args["stride"],
            padding=args["padding"],
            dilation=args["dilation"],
            groups=groups,
            bias=bias is not None,
            device="meta",
        )
    if _install(gm, owner, fresh, {"weight": value}):
        node.replace_all_uses_with(_call_module(gm, node, owner, args["input"]))
        gm.graph.erase_node(node)


def _lift_batchnorm(gm: fx.GraphModule, node: fx.Node) -> None:
    args = _arguments(node)
    if args.get("training") is True:
        return
    state = {k: args.get(k) for k in ("weight", "bias", "running_mean", "running_var")}
    owner = _owner(gm, state, _BATCHNORM_STATE)
    mean = attr_tensor(gm, args["running_mean"])
    x = args["input"]
    rank = getattr(x.meta.get("val"), "ndim", None) if isinstance(x, fx.Node) else None
    if owner is None or mean is None or rank not in _BATCHNORMS:
        return
    affine = args["weight"] is not None
    if affine != (args["bias"] is not None):
        return
    fresh = _BATCHNORMS[rank](
        mean.shape[0],
        eps=float(args["eps"]),
        momentum=args["momentum"],
        affine=affine,
        device="meta",
    )
    if not _install(gm, owner, fresh, {"running_mean": mean}):
        return
    call = _call_module(gm, node, owner, x)
    if node.target is aten.batch_norm.default:
        node.replace_all_uses_with(call)
    else:  # (output, save_mean, save_invstd): only the output is read in eval
        for user in list(node.users):
            if user.target is not operator.getitem or user.args[1] != 0:
                gm.graph.erase_node(call)
                return
            user.replace_all_uses_with(call)
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)
