"""Filter pruning of internal conv chains: the fallback of ``fxkd.students.pruning`` for models
whose channel coupling torch-pruning cannot analyse (ShuffleNet's channel shuffle, RegNet's
grouped bottlenecks, Swin's windowed attention).

A *chain* is a conv A whose output reaches exactly one consumer conv C through nothing but
BatchNorm, elementwise activations, eval identities (dropout) and, optionally, one depthwise
conv D (with its BatchNorm); or a Linear A whose output reaches one consumer Linear C through
activations and dropout (a transformer's MLP: its hidden features)::

    A ─▶ [BN] ─▶ [act] ─▶ [D ─▶ [BN] ─▶ [act]] ─▶ C          (one user at every step)
    Linear ─▶ [act] ─▶ [dropout] ─▶ Linear

A's output channels are internal to the chain: removing some of them removes the same
channels of the BatchNorms and of D, and the matching input channels of C, and nothing else in
the network changes. Block outputs (residual adds, concatenations, shuffles) are never chain
channels, so they keep their width: this prunes *internally*. With grouped A or C the channels
are removed in equal numbers from every group (segments of ``lcm(groups)``), so every conv
keeps its group count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from fxkd.capture import capture, trace
from fxkd.inputs import Inputs
from fxkd.nodes import (
    BATCHNORM_TYPES,
    CONV_TYPES,
    is_elementwise_nonlinearity,
    is_identity,
    only_user,
)
from fxkd.students.common import kept_channels, slice_batchnorm, slice_inputs, slice_outputs

__all__ = ["Chain", "find_chains", "prune_chains"]

log = logging.getLogger(__name__)


@dataclass
class Chain:
    """Module names of one chain: producer, its BatchNorm, the depthwise conv and its
    BatchNorm (None when absent), and the consumer."""

    producer: str
    batchnorm: str | None
    depthwise: str | None
    depthwise_batchnorm: str | None
    consumer: str


def _called(gm: fx.GraphModule, node: fx.Node | None, types: tuple[type, ...]) -> nn.Module | None:
    """The module of one of ``types`` that ``node`` calls, else None."""
    if node is None or node.op != "call_module":
        return None
    m = gm.get_submodule(str(node.target))
    return m if isinstance(m, types) else None


def _conv(gm: fx.GraphModule, node: fx.Node | None) -> nn.Module | None:
    return _called(gm, node, CONV_TYPES)


def _linear(gm: fx.GraphModule, node: fx.Node | None) -> nn.Linear | None:
    return _called(gm, node, (nn.Linear,))


def _walk(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, fx.Node | None]:
    """From a conv's node along single users: its BatchNorm (if any) and the first node that
    is neither BatchNorm nor activation (None when the path forks)."""
    bn = None
    n = only_user(node)
    while n is not None:
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), BATCHNORM_TYPES):
            if bn is not None:
                return bn, None
            bn = str(n.target)
        elif not (is_elementwise_nonlinearity(gm, n) or is_identity(gm, n)):
            return bn, n
        n = only_user(n)
    return bn, None


def find_chains(gm: fx.GraphModule) -> list[Chain]:
    """Every chain of ``gm`` (each module a producer once; a depthwise conv used in a chain
    is not also a producer)."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    chains, taken = [], set()
    for node in gm.graph.nodes:
        lin = _linear(gm, node)
        if lin is not None and calls[str(node.target)] == 1:
            bn, nxt = _walk(gm, node)
            c = _linear(gm, nxt)
            joined = c is not None and calls[str(nxt.target)] == 1
            if bn is None and joined and c.in_features == lin.out_features:
                chains.append(Chain(str(node.target), None, None, None, str(nxt.target)))
            continue
        a = _conv(gm, node)
        name = str(node.target) if a is not None else None
        if a is None or name in taken or calls[name] != 1:
            continue
        bn, nxt = _walk(gm, node)
        d = _conv(gm, nxt) if nxt is not None else None
        dw = dw_bn = None
        if d is not None and d.groups == d.in_channels == d.out_channels == a.out_channels:
            dw = str(nxt.target)
            dw_bn, nxt = _walk(gm, nxt)
            d = _conv(gm, nxt) if nxt is not None else None
        if d is None or d.in_channels != a.out_channels or calls[str(nxt.target)] != 1:
            continue
        if dw is not None and calls[dw] != 1:
            continue
        chains.append(Chain(name, bn, dw, dw_bn, str(nxt.target)))
        if dw is not None:
            taken.add(dw)
    return chains


def prune_chains(
    model: nn.Module,
    ratio: float,
    importance: str = "l1",
    ignored: tuple[nn.Module, ...] = (),
    example_inputs=None,
) -> dict[str, list[int]]:
    """Prune ``ratio`` of every chain's internal channels of ``model`` in place (scored by the
    producer's filter L1 norms, or its BatchNorm's |γ| with ``importance="bn"``); returns the
    channel maps ``{producer (and depthwise conv): kept teacher channels}``. With
    ``example_inputs``, the model is captured by either front-end (``fxkd.capture``), else
    symbolically traced."""
    example = None if example_inputs is None else Inputs.example(example_inputs)
    gm = trace(model) if example is None else capture(model, example)
    maps: dict[str, list[int]] = {}
    for chain in find_chains(gm):
        a = model.get_submodule(chain.producer)
        c = model.get_submodule(chain.consumer)
        if a in ignored:
            continue
        bn = model.get_submodule(chain.batchnorm) if chain.batchnorm else None
        channels = a.out_features if isinstance(a, nn.Linear) else a.out_channels
        segments = 1 if isinstance(a, nn.Linear) else math.lcm(a.groups, c.groups)
        if channels % segments:
            continue
        if importance == "bn" and bn is not None and bn.weight is not None:
            scores = bn.weight.detach().abs()
        else:
            scores = a.weight.detach().flatten(1).abs().sum(1)
        kept = kept_channels(scores, ratio, segments)
        if kept is None:
            continue
        index = torch.tensor(kept)
        slice_outputs(a, index)
        if bn is not None:
            slice_batchnorm(bn, index)
        if chain.depthwise:
            slice_outputs(model.get_submodule(chain.depthwise), index, depthwise=True)
            maps[chain.depthwise] = list(kept)
            if chain.depthwise_batchnorm:
                slice_batchnorm(model.get_submodule(chain.depthwise_batchnorm), index)
        slice_inputs(c, kept, channels)
        maps[chain.producer] = list(kept)
        log.debug(
            "chain %s -> %s: kept %d of %d", chain.producer, chain.consumer, len(kept), channels
        )
    return maps
