"""Choose, from the samples, which teacher channels a pruned student's internal channels imitate.

A pruned student's channel map says which teacher channel each student channel must reproduce
(the pruner's choice: filter norms, BatchNorm scales — no data). Where those channels are
*internal* — a producer A whose output reaches exactly one consumer C through per-channel steps
only (BatchNorm, activations, pooling, dropout; ``internal_links``) — nothing else in the network
reads them, and kernel-mode calibration re-solves C's whole kernel on whatever the student's A
produces. So the channels worth imitating are those from which C's teacher output is best
reconstructed: for each such A, the teacher's C input (its channels' k² taps) and C's output
(through its BatchNorm, restricted to C's own channel map) give normal equations, and
``fxkd.solve.selection.select_groups`` picks greedily the channels that explain most of that
output. Links are chosen from the network's end backwards, so C's map is final when A's is
chosen. Where the student's A reads only some of the teacher's input channels, and which ones
is known and final (a residual stream, a network input), A's channels are scored as the student
can reproduce them from those inputs (``fxkd.passes.reproduce``), not as the teacher has them.
Only the alignment's maps change: shapes, weights and the student are untouched.

This is ThiNet / He et al.'s channel selection, used here to re-target calibration rather than
to prune. It needs kernel mode (a pointwise adapter can only mix the channels A computes) and
enough rows for A's kernel; sites that do not qualify keep their map.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter

import torch
import torch.fx as fx
from torch import nn

from fxkd.align import SitePair
from fxkd.capture import eval_mode
from fxkd.config import CompressConfig
from fxkd.inputs import Inputs
from fxkd.nodes import (
    BATCHNORM_TYPES,
    CONV_TYPES,
    affine_module,
    is_per_channel,
    module_call_counts,
    only_user,
)
from fxkd.solve.normal import layer_equations
from fxkd.solve.selection import select_groups

from .reproduce import input_channels, replayable, reproducible_values
from .runner import GraphRunner

__all__ = ["Link", "internal_links", "select_channel_maps"]

log = logging.getLogger(__name__)

MAP_SOURCE = "selected"


@dataclasses.dataclass(frozen=True)
class Link:
    """A producer whose output channels only one consumer reads (teacher node names): the
    consumer, the value it reads (``source``) and what its output is compared at (``target``:
    the consumer's output, or its BatchNorm's); ``node`` calls the producer and ``steps`` are
    the per-channel steps from its output to ``source``, in order."""

    producer: str
    consumer: str
    source: str
    target: str
    node: str = ""
    steps: tuple[str, ...] = ()


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _ungrouped_affine(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    m = affine_module(gm, node)
    return m if m is not None and getattr(m, "groups", 1) == 1 else None


def internal_links(gm: fx.GraphModule) -> list[Link]:
    """Every ungrouped conv/linear producer of ``gm`` called once whose output reaches exactly
    one ungrouped conv/linear consumer (called once, of the same kind) through single-user
    per-channel steps, in graph order."""
    calls = module_call_counts(gm)
    links = []
    for node in gm.graph.nodes:
        a = _ungrouped_affine(gm, node)
        if a is None or calls[str(node.target)] != 1:
            continue
        prev, nxt, steps = node, only_user(node), []
        while nxt is not None and nxt.args and nxt.args[0] is prev and is_per_channel(gm, nxt):
            steps.append(nxt.name)
            prev, nxt = nxt, only_user(nxt)
        c = _ungrouped_affine(gm, nxt) if nxt is not None else None
        if c is None or type(c) is not type(a) or calls[str(nxt.target)] != 1:
            continue
        if nxt.args[0] is not prev:
            continue
        target = nxt
        bn = only_user(nxt)
        if bn is not None and isinstance(_module(gm, bn), BATCHNORM_TYPES):
            target = bn
        links.append(
            Link(str(node.target), str(nxt.target), prev.name, target.name, node.name, tuple(steps))
        )
    return links


def select_channel_maps(
    teacher: fx.GraphModule,
    student: fx.GraphModule,
    pairs: list[SitePair],
    samples: torch.Tensor | Inputs,
    config: CompressConfig | None = None,
) -> list[SitePair]:
    """``pairs`` with the channel maps of the student's internal sites chosen from ``samples``
    (see the module docstring; ``map_source="selected"``); every other pair is returned as it
    is. ``teacher``/``student``: the graphs the pairs were aligned on (the student may carry
    adapters). One teacher pass over the samples, up to the last consumer read."""
    config = config or CompressConfig()
    samples = Inputs.of(samples)
    index = {p.site.module: i for i, p in enumerate(pairs)}
    t_nodes = {n.name: n for n in teacher.graph.nodes}
    links = [
        link
        for link in internal_links(teacher)
        if link.producer in index and _qualifies(pairs[index[link.producer]], student, len(samples))
    ]
    if not links:
        return list(pairs)
    chunks = samples.split(config.chunk_size)
    producers = {link.producer for link in links}
    restricted = _restricted_inputs(teacher, t_nodes, student, pairs, links, producers)
    needs = Counter(name for link in links for name in _reads(link, restricted, t_nodes))
    wanted = {t_nodes[name] for name in needs}
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    runner = GraphRunner(
        teacher,
        [c.to(device=device) for c in chunks],
        pinned=wanted,
        device=device,
        offload=config.offload,
    )
    out = list(pairs)
    waiting = []  # links whose consumer's own map is not chosen yet: chosen last, backwards
    chosen = 0
    with torch.no_grad(), eval_mode(teacher):
        for link in links:
            source, target = t_nodes[link.source], t_nodes[link.target]
            runner.run_through(target)
            consumer = teacher.get_submodule(link.consumer)
            count = len(chunks)  # one chunk at a time on the device (held offloaded or not)
            if link.producer in restricted:  # what the student's producer can reproduce
                steps = [t_nodes[name] for name in link.steps]
                node, in_map = t_nodes[link.node], restricted[link.producer]
                sources = reproducible_values(
                    teacher, node, steps, runner, count, in_map, config.fixed_ridge
                )
            else:
                sources = (runner.chunk(source, i) for i in range(count))
            eqs = layer_equations(
                consumer, sources, (runner.chunk(target, i) for i in range(count))
            )
            for name in _reads(link, restricted, t_nodes):
                needs[name] -= 1
                if not needs[name]:
                    runner.unpin(t_nodes[name])
            system = (eqs.gram[0], eqs.cross[0], eqs.rows)
            if link.consumer in producers:  # (held: the Gram is at the teacher's width)
                waiting.append((link, system))
            else:
                chosen += _choose(link, system, out, index)
    for link, system in reversed(waiting):  # a consumer's map is final before its producer's
        chosen += _choose(link, system, out, index)
    log.info("channel selection: %d of %d internal sites re-targeted", chosen, len(links))
    return out


def _restricted_inputs(
    teacher, t_nodes, student, pairs, links, producers
) -> dict[str, tuple[int, ...]]:
    """The links' producers whose student copy reads only some of the teacher's input channels,
    known and final (``fxkd.passes.reproduce.input_channels``), and whose steps to the
    consumer can be replayed on a refitted output: their teacher input channels."""
    maps = {p.site.module: p.channel_map for p in pairs}
    out = {}
    for link in links:
        if not replayable([t_nodes[name] for name in link.steps]):
            continue
        node = t_nodes[link.node]
        in_map = input_channels(teacher, node, maps, producers)
        width = student.get_submodule(link.producer).weight.shape[1]
        if (
            in_map is not None
            and len(in_map) == width < affine_module(teacher, node).weight.shape[1]
        ):
            out[link.producer] = in_map
    return out


def _reads(link: Link, restricted: dict, t_nodes: dict) -> tuple[str, ...]:
    """The teacher nodes a link's system reads: its source and target, and the producer's
    input and output where the producer is refitted on a restricted input."""
    if link.producer not in restricted:
        return (link.source, link.target)
    return (link.source, link.target, link.node, t_nodes[link.node].args[0].name)


def _choose(link: Link, system, out: list[SitePair], index: dict[str, int]) -> bool:
    """Choose ``link.producer``'s map from its consumer's ``system`` (gram, cross, rows),
    restricted to the consumer's current map, and write it into ``out``. Whether it changed."""
    gram, cross, rows = system
    pair = out[index[link.producer]]
    consumer = index.get(link.consumer)
    keep = out[consumer].channel_map if consumer is not None else None
    if keep is not None:
        cross = cross[:, list(keep)]
    count = len(pair.channel_map)
    taps = (gram.shape[0] - 1) // pair.teacher_channels
    if rows < 2 * count * taps:  # (measured: a stricter rule, rows >= 4·features, loses most
        # of the gain at N=10 on VGG L1-75 and does not undo the one loss there)
        log.info("%s: %d rows to choose %d channels: map kept", link.producer, rows, count)
        return False
    selected = tuple(select_groups(gram, cross, pair.teacher_channels, count))
    out[index[link.producer]] = dataclasses.replace(
        pair, channel_map=selected, map_source=MAP_SOURCE
    )
    log.debug("%s: imitates teacher channels %s", link.producer, selected)
    return selected != tuple(sorted(pair.channel_map))


def _qualifies(pair: SitePair, student: fx.GraphModule, num_samples: int) -> bool:
    """A pruned, ungrouped site that kernel-mode calibration solves as a kernel (rows enough
    for its unknowns)."""
    site = pair.site
    if pair.channel_map is None or len(pair.channel_map) >= pair.teacher_channels:
        return False
    if site.groups != 1 or site.residual is not None:
        return False
    module = student.get_submodule(site.module)
    if not isinstance(module, (nn.Linear, *CONV_TYPES)):
        return False
    positions = math.prod(site.shape[2:]) if site.dims else math.prod(site.shape[1:-1])
    return num_samples * positions >= module.weight[0].numel()
