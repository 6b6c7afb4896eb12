"""Filter pruning of residual streams: block outputs, where torch-pruning cannot analyse a model.

A *stream* is a channel space shared through residual adds: every tensor whose channel c is
the same channel c of the others, because it is the output of a per-channel op (BatchNorm,
activation, pooling, dropout) of a stream tensor or an ``a + b`` of two stream tensors. Its
channels are produced by ungrouped convs (each add's branches: e.g. a bottleneck's last conv,
a projection shortcut) and read by ungrouped convs (the next blocks' first convs and
projections) or by the classifier's Linear after global pooling. Removing a channel of a stream
removes it from every producer (and BatchNorm on the stream) and the matching input channel of
every reader, so every add still adds matching channels::

    proj ─▶ BN ─┐                       ┌─▶ conv_a (next block)
                 add ─▶ ReLU ─▶ ... add ─┤
    conv_c ─▶ BN ┘                       └─▶ proj (next stage)

Any other use of a stream tensor (concatenation, reshapes, channel shuffles, slicing, grouped or
depthwise convs, the model's output) makes it unprunable: it keeps its width. Chains inside
blocks are fxkd.students.chains's; this prunes what they leave: the block outputs (RegNet's stages).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from fxkd.capture import annotate_shapes, capture, node_shape
from fxkd.inputs import Inputs
from fxkd.nodes import (
    BATCHNORM_TYPES,
    CONV_TYPES,
    PER_CHANNEL_FUNCTIONS,
    PER_CHANNEL_MODULES,
    add_operands,
    is_elementwise_nonlinearity,
)
from fxkd.students.common import kept_channels, slice_batchnorm, slice_inputs, slice_outputs

__all__ = ["Stream", "find_streams", "prune_streams"]

log = logging.getLogger(__name__)


@dataclass
class Stream:
    """Module names of one residual stream: the convs that produce its channels, the
    BatchNorms on it, and the convs / Linears that read it."""

    channels: int
    producers: list[str] = field(default_factory=list)
    batchnorms: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)


class _Spaces:
    """Union-find over channel spaces with what each space's channels touch."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.info: dict[int, dict] = {}

    def new(self, channels: int | None) -> int:
        k = len(self.parent)
        self.parent[k] = k
        self.info[k] = {"channels": channels, "frozen": channels is None, "adds": 0,
                        "producers": [], "batchnorms": [], "readers": []}  # fmt: skip
        return k

    def find(self, k: int) -> int:
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        self.parent[b] = a
        ia, ib = self.info[a], self.info[b]
        ia["frozen"] |= ib["frozen"] or ia["channels"] != ib["channels"]
        ia["adds"] += ib["adds"]
        for key in ("producers", "batchnorms", "readers"):
            ia[key] += ib[key]
        return a

    def get(self, k: int) -> dict:
        return self.info[self.find(k)]


def _features(node: fx.Node) -> int | None:
    """C of a (N, C) value (what a Linear reading a pooled stream sees), else None."""
    shape = node_shape(node)
    return shape[1] if shape is not None and len(shape) == 2 else None


def _channels(node: fx.Node) -> int | None:
    shape = node_shape(node)
    return shape[1] if shape is not None and len(shape) >= 2 else None


def find_streams(gm: fx.GraphModule, example_inputs: torch.Tensor) -> list[Stream]:
    """The prunable residual streams of ``gm`` (shapes from one run on ``example_inputs``)."""
    annotate_shapes(gm, Inputs.example(example_inputs))
    spaces = _Spaces()
    of: dict[fx.Node, int] = {}

    def freeze(arg) -> None:
        for a in arg if isinstance(arg, (list, tuple)) else [arg]:
            if isinstance(a, fx.Node) and a in of:
                spaces.get(of[a])["frozen"] = True

    for node in gm.graph.nodes:
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        operands = add_operands(node)
        if isinstance(module, CONV_TYPES) and module.groups == 1:
            spaces.get(of[first])["readers"].append(str(node.target))
            of[node] = spaces.new(_channels(node))
            spaces.get(of[node])["producers"].append(str(node.target))
        elif (
            isinstance(module, nn.Linear) and first in of and module.in_features == _features(first)
        ):
            spaces.get(of[first])["readers"].append(str(node.target))
            of[node] = spaces.new(None)
        elif first in of and len(node.all_input_nodes) == 1 and (
            isinstance(module, PER_CHANNEL_MODULES)
            or (node.op == "call_function" and node.target in PER_CHANNEL_FUNCTIONS)
            or is_elementwise_nonlinearity(gm, node)
            or (_is_flatten(node) and _flattens_channels_only(node))
        ):  # fmt: skip
            of[node] = of[first]
            if isinstance(module, BATCHNORM_TYPES):
                spaces.get(of[node])["batchnorms"].append(str(node.target))
        elif operands is not None and all(a in of for a in operands):
            a, b = operands
            of[node] = spaces.union(of[a], of[b])
            spaces.get(of[node])["adds"] += 1
        else:  # an op fxkd does not model on channels: everything it touches keeps its width
            for arg in node.all_input_nodes:
                freeze(arg)
            of[node] = spaces.new(None)
    streams, seen = [], set()
    for k in of.values():
        root = spaces.find(k)
        info = spaces.info[root]
        if root in seen or info["frozen"] or not info["adds"] or not info["producers"]:
            continue
        seen.add(root)
        streams.append(
            Stream(info["channels"], info["producers"], info["batchnorms"], info["readers"])
        )
    return streams


def _is_flatten(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    )


def _flattens_channels_only(node: fx.Node) -> bool:
    """torch.flatten(x, 1) of a (N, C, 1, ...) value: channel c stays feature c."""
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    shape = node_shape(node.args[0])
    return start == 1 and shape is not None and math.prod(shape[2:]) == 1


def prune_streams(
    model: nn.Module,
    ratio: float,
    example_inputs: torch.Tensor,
    importance: str = "l1",
    ignored: tuple[nn.Module, ...] = (),
) -> tuple[dict[str, list[int]], list[Stream]]:
    """Prune ``ratio`` of every residual stream's channels of ``model`` in place (scored by the
    producers' filter L1 norms summed, or the stream BatchNorms' |γ| with ``importance="bn"``);
    returns the channel maps ``{producer: kept teacher channels}`` and the streams pruned. A
    stream with an ignored producer keeps its width."""
    gm = capture(model, Inputs.example(example_inputs))
    maps: dict[str, list[int]] = {}
    pruned: list[Stream] = []
    for stream in find_streams(gm, example_inputs):
        producers = [model.get_submodule(p) for p in stream.producers]
        if any(p in ignored for p in producers):
            continue
        bns = [model.get_submodule(b) for b in stream.batchnorms]
        if importance == "bn" and bns and all(b.weight is not None for b in bns):
            scores = sum(b.weight.detach().abs() for b in bns)
        else:
            scores = sum(p.weight.detach().flatten(1).abs().sum(1) for p in producers)
        kept = kept_channels(scores, ratio, 1)
        if kept is None:
            continue
        index = torch.tensor(kept)
        for name, conv in zip(stream.producers, producers, strict=True):
            slice_outputs(conv, index)
            maps[name] = list(kept)
        for bn in bns:
            slice_batchnorm(bn, index)
        for name in stream.readers:
            slice_inputs(model.get_submodule(name), kept, stream.channels)
        pruned.append(stream)
        log.debug("stream of %s: kept %d of %d", stream.producers, len(kept), stream.channels)
    return maps, pruned
