"""Filter pruning of internal conv chains: the fallback of ``fxkd.students.prune`` for models
whose channel coupling torch-pruning cannot analyse (ShuffleNet's channel shuffle, RegNet's
grouped bottlenecks).

A *chain* is a conv A whose output reaches exactly one consumer conv C through nothing but
BatchNorm, elementwise activations and, optionally, one depthwise conv D (with its BatchNorm)::

    A ─▶ [BN] ─▶ [act] ─▶ [D ─▶ [BN] ─▶ [act]] ─▶ C          (one user at every step)

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

from fxkd.nodes import is_elementwise_nonlinearity
from fxkd.trace import trace

__all__ = ["Chain", "find_chains", "prune_chains"]

log = logging.getLogger(__name__)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class Chain:
    """Module names of one chain: producer, its BatchNorm, the depthwise conv and its
    BatchNorm (None when absent), and the consumer."""

    producer: str
    batchnorm: str | None
    depthwise: str | None
    depthwise_batchnorm: str | None
    consumer: str


def _conv(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    m = gm.get_submodule(str(node.target))
    return m if isinstance(m, _CONVS) else None


def _next(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _walk(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, fx.Node | None]:
    """From a conv's node along single users: its BatchNorm (if any) and the first node that
    is neither BatchNorm nor activation (None when the path forks)."""
    bn = None
    n = _next(node)
    while n is not None:
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), _BN):
            if bn is not None:
                return bn, None
            bn = str(n.target)
        elif not is_elementwise_nonlinearity(gm, n):
            return bn, n
        n = _next(n)
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


def _kept(scores: torch.Tensor, ratio: float, segments: int) -> list[int] | None:
    """The channels kept: in each of ``segments`` equal segments, the highest-scoring
    ``s − floor(s·ratio)`` (at least one); None when nothing would be removed."""
    size = len(scores) // segments
    drop = min(math.floor(size * ratio), size - 1)
    if drop <= 0:
        return None
    kept = []
    for s in range(segments):
        seg = scores[s * size : (s + 1) * size]
        kept += sorted(int(i) + s * size for i in seg.argsort(descending=True)[: size - drop])
    return kept


def _slice_out(conv: nn.Module, kept: torch.Tensor, depthwise: bool = False) -> None:
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[kept].clone())
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias[kept].clone())
    conv.out_channels = len(kept)
    if depthwise:
        conv.in_channels = conv.groups = len(kept)


def _slice_in(conv: nn.Module, kept: list[int], channels: int) -> None:
    """Keep input channels ``kept`` of ``channels`` (of a conv: per group, the local indices
    kept; of a Linear: its input features)."""
    if isinstance(conv, nn.Linear):
        with torch.no_grad():
            conv.weight = nn.Parameter(conv.weight[:, torch.tensor(kept)].clone())
        conv.in_features = len(kept)
        return
    g = conv.groups
    per = channels // g
    local = [[k % per for k in kept if k // per == grp] for grp in range(g)]
    out_per = conv.out_channels // g
    with torch.no_grad():
        parts = [
            conv.weight[grp * out_per : (grp + 1) * out_per][:, torch.tensor(idx)]
            for grp, idx in enumerate(local)
        ]
        conv.weight = nn.Parameter(torch.cat(parts).clone())
    conv.in_channels = len(kept)


def _slice_bn(bn: nn.Module, kept: torch.Tensor) -> None:
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight = nn.Parameter(bn.weight[kept].clone())
            bn.bias = nn.Parameter(bn.bias[kept].clone())
        if bn.running_mean is not None:
            bn.running_mean = bn.running_mean[kept].clone()
            bn.running_var = bn.running_var[kept].clone()
    bn.num_features = len(kept)


def prune_chains(
    model: nn.Module,
    ratio: float,
    importance: str = "l1",
    ignored: tuple[nn.Module, ...] = (),
) -> dict[str, list[int]]:
    """Prune ``ratio`` of every chain's internal channels of ``model`` in place (scored by the
    producer's filter L1 norms, or its BatchNorm's |γ| with ``importance="bn"``); returns the
    channel maps ``{producer (and depthwise conv): kept teacher channels}``."""
    gm = trace(model)
    maps: dict[str, list[int]] = {}
    for chain in find_chains(gm):
        a = model.get_submodule(chain.producer)
        c = model.get_submodule(chain.consumer)
        if a in ignored:
            continue
        bn = model.get_submodule(chain.batchnorm) if chain.batchnorm else None
        channels = a.out_channels
        segments = math.lcm(a.groups, c.groups)
        if channels % segments:
            continue
        if importance == "bn" and bn is not None and bn.weight is not None:
            scores = bn.weight.detach().abs()
        else:
            scores = a.weight.detach().flatten(1).abs().sum(1)
        kept = _kept(scores, ratio, segments)
        if kept is None:
            continue
        index = torch.tensor(kept)
        _slice_out(a, index)
        if bn is not None:
            _slice_bn(bn, index)
        if chain.depthwise:
            _slice_out(model.get_submodule(chain.depthwise), index, depthwise=True)
            maps[chain.depthwise] = list(kept)
            if chain.depthwise_batchnorm:
                _slice_bn(model.get_submodule(chain.depthwise_batchnorm), index)
        _slice_in(c, kept, channels)
        maps[chain.producer] = list(kept)
        log.debug(
            "chain %s -> %s: kept %d of %d", chain.producer, chain.consumer, len(kept), channels
        )
    return maps
