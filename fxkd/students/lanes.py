"""Filter pruning through channel routing: concatenations, chunks and splits, channel shuffles.

A *lane* is one output channel of an ungrouped conv (one filter), followed through every op
that only moves channels: per-channel ops (BatchNorm, activations, pooling, a depthwise conv,
a spatial mean) keep it in place, ``cat``/``chunk``/``split``/``view``/``transpose``/``permute``
/``reshape``/``flatten`` move it, and it ends where a *reader* (an ungrouped conv, or a Linear
over a pooled ``(N, C)`` value) takes it as an input channel. Which channel goes where is not
derived from rules per op: the traced graph is run on *tags*, tensors whose channel c holds the
lane's id, so the routing ops themselves say where every lane lands (ShuffleNet v2's
``channel_shuffle`` is a view → transpose → view that interleaves two halves; its ``chunk``
splits them again).

Pruning a lane removes its filter, its entries in every BatchNorm/depthwise conv it passes and
its input channel in every reader. In the pruned network the same routing ops run on narrower
tensors and route differently (a chunk of a narrower tensor splits elsewhere), so the student's
channel j of producer p may stand for teacher filter σ_p(j) only if both are read by the same
modules: the *signature* of a lane (the readers and weighted per-channel modules on its path)
must be equal in the two networks. ``prune_lanes`` therefore runs the tags once at the teacher's
widths and once at each candidate pruned width, keeps the highest-scoring teacher filters of
each signature class and assigns them to the student slots of the same class. The student is
then exactly the teacher restricted to the kept lanes (before calibration), its channels' order
free.

A *region* is a set of producers whose lanes meet in one tensor (a ShuffleNet stage, a stem
feeding two branches, a last conv feeding the classifier). A region whose lanes reach anything
else (an add, a grouped conv, a reshape that mixes channels with positions, the output), or
whose producers were already pruned, keeps its width. Residual adds are fxkd.students.streams's.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxkd.capture import node_shape, trace
from fxkd.nodes import (
    BATCHNORM_TYPES,
    CONV_TYPES,
    PER_CHANNEL_FUNCTIONS,
    PER_CHANNEL_MODULES,
    is_elementwise_nonlinearity,
    module_call_counts,
)
from fxkd.students.common import slice_batchnorm, slice_inputs, slice_outputs

__all__ = ["Region", "prune_lanes"]

log = logging.getLogger(__name__)
_ROUTING_FUNCTIONS = {
    torch.cat,
    torch.concat,
    torch.chunk,
    torch.split,
    torch.transpose,
    torch.permute,
    torch.reshape,
    torch.flatten,
    operator.getitem,
}
_ROUTING_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "chunk", "split",
                    "flatten", "size", "dim"}  # fmt: skip
_SPATIAL_REDUCTIONS = {"mean", "amax", "sum"}


@dataclass
class Region:
    """Producers (conv module names) whose lanes meet in one tensor, their teacher widths and
    the widths they were pruned to."""

    producers: list[str]
    widths: list[int]
    kept: list[int] = field(default_factory=list)


@dataclass
class _Run:
    """What one tag run saw: lane id → (producer, filter/slot); lanes that reach an op fxkd
    does not model; per weighted module (reader, BatchNorm, depthwise conv) the lane at each
    input channel; lane groups that met in one tensor."""

    lanes: dict[int, tuple[str, int]] = field(default_factory=dict)
    frozen: set[int] = field(default_factory=set)
    inputs: dict[str, list[int]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    meetings: list[set[int]] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)
    next_id: int = 1

    def fresh(self, n: int, producer: str | None = None) -> torch.Tensor:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        for j, i in enumerate(ids):
            if producer is None:
                self.frozen.add(i)
            else:
                self.lanes[i] = (producer, j)
        return torch.tensor(ids, dtype=torch.float64)

    @cached_property
    def signatures(self) -> dict[int, tuple[str, ...]]:
        """Per lane, the weighted modules (readers, BatchNorms, depthwise convs) that take it
        (read once the run is over)."""
        sig: dict[int, list[str]] = defaultdict(list)
        for module, lanes in self.inputs.items():
            for lane in lanes:
                sig[lane].append(module)
        return {k: tuple(sorted(v)) for k, v in sig.items()}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _ids(t: torch.Tensor) -> set[int]:
    return {int(v) for v in t.unique().tolist() if v > 0} if t.is_floating_point() else set()


def _channel_ids(t: torch.Tensor) -> list[int] | None:
    """The lane at each channel (dim 1) of a tag tensor, None when a channel's positions hold
    different lanes (an op mixed channels with positions)."""
    if t.dim() < 2 or not t.is_floating_point():
        return None
    flat = t[0].reshape(t.shape[1], -1)
    if flat.numel() == 0 or not bool((flat == flat[:, :1]).all()):
        return None
    return [int(v) for v in flat[:, 0].tolist()]


class _TagRun(fx.Interpreter):
    """Runs ``gm`` on tag tensors (batch 1, the example's spatial sizes); ``widths`` overrides
    producers' output widths."""

    def __init__(self, gm: fx.GraphModule, widths: dict[str, int], calls: dict[str, int]):
        super().__init__(gm)
        self.widths = widths
        self.calls = calls
        self.seen = _Run()

    def _tag(self, ids: torch.Tensor, node: fx.Node) -> torch.Tensor | None:
        shape = node_shape(node)
        if shape is None or len(shape) < 2:
            return None
        spatial = shape[2:]
        return ids.reshape(1, -1, *[1] * len(spatial)).expand(1, len(ids), *spatial).clone()

    def _opaque(self, node: fx.Node, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        for t in inputs:
            self.seen.frozen |= _ids(t)
        shape = node_shape(node)
        if shape is None or len(shape) < 2:
            return torch.zeros(1, *shape[1:], dtype=torch.float64) if shape else None
        return self._tag(self.seen.fresh(shape[1]), node)

    def _record(self, name: str, kind: str, t: torch.Tensor) -> list[int] | None:
        ids = _channel_ids(t)
        if ids is None or self.calls.get(name, 0) != 1 or name in self.seen.inputs:
            self.seen.frozen |= _ids(t)
            return None
        self.seen.inputs[name] = ids
        self.seen.kinds[name] = kind
        return ids

    def run_node(self, n: fx.Node):
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        inputs = _tensors((args, kwargs))
        for t in inputs:
            ids = _ids(t)
            if len(ids) > 1:
                self.seen.meetings.append(ids)
        if n.op == "placeholder":
            return self._opaque(n, [])
        if n.op == "output":
            for t in inputs:
                self.seen.frozen |= _ids(t)
            return args[0]
        if n.op == "get_attr":  # a parameter or buffer: one frozen id over the whole tensor
            value = self.fetch_attr(str(n.target))
            if not isinstance(value, torch.Tensor):
                return value
            return torch.full(value.shape, float(self.seen.fresh(1)[0]), dtype=torch.float64)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if n.op == "call_module":
            name = str(n.target)
            m = self.module.get_submodule(name)
            if isinstance(m, CONV_TYPES) and m.groups == 1 and first is not None:
                self._record(name, "reader", first)
                width = self.widths.get(name, m.out_channels)
                tag = self._tag(self.seen.fresh(width, name), n)
                if self.calls.get(name, 0) != 1:
                    self.seen.frozen |= _ids(tag)
                return tag
            if isinstance(m, nn.Linear) and first is not None and first.dim() == 2:
                self._record(name, "reader", first)
                return self._opaque(n, [])
            depthwise = isinstance(m, CONV_TYPES) and m.groups == m.in_channels == m.out_channels
            elementwise = is_elementwise_nonlinearity(self.module, n)
            if first is not None and len(inputs) == 1 and (
                depthwise or elementwise or isinstance(m, PER_CHANNEL_MODULES)
            ):  # fmt: skip
                if depthwise or isinstance(m, BATCHNORM_TYPES):
                    kind = "depthwise" if depthwise else "batchnorm"
                    ids = self._record(name, kind, first)
                else:
                    ids = _channel_ids(first)
                return self._pass(n, first, ids)
            if isinstance(m, (nn.Flatten, nn.Unflatten)):  # reshapes: routing like view
                return self._route(n, inputs)
            return self._opaque(n, inputs)
        if first is not None and len(inputs) == 1 and self._per_channel(n, args, kwargs):
            return self._pass(n, first, _channel_ids(first))
        routing = (n.op == "call_function" and n.target in _ROUTING_FUNCTIONS) or (
            n.op == "call_method" and n.target in _ROUTING_METHODS
        )
        if routing or not inputs:
            return self._route(n, inputs)
        return self._opaque(n, inputs)

    def _route(self, n: fx.Node, inputs: list[torch.Tensor]):
        """Run an op that only moves values (or makes no tensor from tensors) on the tags."""
        try:
            out = super().run_node(n)
        except Exception:  # shapes that do not route at these widths
            for t in inputs:
                self.seen.failed |= _ids(t)
            return self._opaque(n, inputs)
        # a tensor made from no tensor (torch.zeros, arange) carries no lane
        return self._opaque(n, []) if not inputs and _tensors(out) else out

    def _per_channel(self, n: fx.Node, args, kwargs) -> bool:
        if is_elementwise_nonlinearity(self.module, n):
            return True
        if n.op == "call_function" and n.target in PER_CHANNEL_FUNCTIONS:
            return True
        if n.op == "call_method" and n.target in _SPATIAL_REDUCTIONS:
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else dims
            return bool(dims) and all(isinstance(d, int) and d >= 2 for d in dims)
        return False

    def _pass(self, n: fx.Node, t: torch.Tensor, ids: list[int] | None) -> torch.Tensor | None:
        if ids is None:
            return self._opaque(n, [t])
        return self._tag(torch.tensor(ids, dtype=torch.float64), n)


def _tag_run(gm, example_shape, widths, calls) -> _Run:
    run = _TagRun(gm, widths, calls)
    run.run(torch.zeros(1, *example_shape[1:], dtype=torch.float64))
    return run.seen


def _regions(seen: _Run) -> list[list[str]]:
    """Producers grouped by the tensors their lanes meet in (union-find), frozen ones out."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    frozen = {seen.lanes[i][0] for i in seen.frozen | seen.failed if i in seen.lanes}
    frozen.add("")
    for p, _ in seen.lanes.values():
        find(p)
    for ids in seen.meetings:
        owners = {seen.lanes[i][0] if i in seen.lanes else "" for i in ids}
        first = owners.pop()
        for other in owners:
            parent[find(other)] = find(first)
    groups: dict[str, list[str]] = defaultdict(list)
    for p in list(parent):
        groups[find(p)].append(p)
    bad = {find(p) for p in frozen if p in parent}
    return [sorted(g) for root, g in groups.items() if root not in bad and "" not in g]


def _scores(model, seen: _Run, producer: str, importance: str) -> torch.Tensor:
    conv = model.get_submodule(producer)
    l1 = conv.weight.detach().flatten(1).abs().sum(1).double()
    if importance != "bn":
        return l1
    width = len(l1)
    gamma = torch.zeros(width, dtype=torch.float64)
    hit = torch.zeros(width, dtype=torch.bool)
    for name, lanes in seen.inputs.items():
        if seen.kinds[name] != "batchnorm":
            continue
        bn = model.get_submodule(name)
        if bn.weight is None:
            continue
        for pos, lane in enumerate(lanes):
            owner = seen.lanes.get(lane)
            if owner is not None and owner[0] == producer:
                gamma[owner[1]] += float(bn.weight[pos].detach().abs())
                hit[owner[1]] = True
    return gamma if bool(hit.all()) else l1


def _assign(teacher: _Run, pruned: _Run, producers, importance, model) -> dict | None:
    """σ_p for every producer: student slot j → teacher filter, within signature classes (the
    highest-scoring filters of each class); None when a class has more student slots than
    teacher filters."""
    by_owner_t: dict[tuple[str, tuple], list[int]] = defaultdict(list)
    for lane, (p, f) in teacher.lanes.items():
        if p in producers:
            by_owner_t[(p, teacher.signatures.get(lane, ()))].append(f)
    by_owner_s: dict[tuple[str, tuple], list[int]] = defaultdict(list)
    for lane, (p, j) in pruned.lanes.items():
        if p in producers:
            by_owner_s[(p, pruned.signatures.get(lane, ()))].append(j)
    if any(len(js) > len(by_owner_t.get(k, ())) for k, js in by_owner_s.items()):
        return None
    scores = {p: _scores(model, teacher, p, importance) for p in producers}
    slots: dict[str, dict[int, int]] = {p: {} for p in producers}
    for (p, sig), js in by_owner_s.items():
        fs = by_owner_t[(p, sig)]
        best = sorted(sorted(fs, key=lambda f: -float(scores[p][f]))[: len(js)])
        slots[p].update(zip(sorted(js), best, strict=True))
    return {p: [slots[p][j] for j in range(len(slots[p]))] for p in producers}


def _candidates(widths: list[int], ratio: float):
    """Width vectors to try: ``ratio`` of each removed, then nudged by ±1, ±2, ... on the
    widest (the others in proportion), up to a quarter of the widest's width."""
    widest = max(widths)
    base = [w - int(w * ratio) for w in widths]
    for step in range(max(1, widest // 4)):
        for delta in (0,) if step == 0 else (step, -step):
            ws = [
                max(1, min(w, b + round(delta * w / widest)))
                for w, b in zip(widths, base, strict=True)
            ]
            if any(a < w for a, w in zip(ws, widths, strict=True)):
                yield ws


def prune_lanes(
    model: nn.Module,
    ratio: float,
    example_inputs: torch.Tensor,
    importance: str = "l1",
    skip: set[str] = frozenset(),
) -> tuple[dict[str, list[int]], list[Region]]:
    """Prune about ``ratio`` of the lanes of every routing region of ``model`` in place (scored
    by the producers' filter L1 norms or, with ``importance="bn"``, the |γ| of the BatchNorms
    each lane passes); ``skip`` names producers that keep their width (already pruned, or
    ignored). Returns the channel maps ``{producer or depthwise conv: teacher channels}`` and
    the regions pruned."""
    gm = trace(model)
    ShapeProp(gm).propagate(example_inputs)
    calls = module_call_counts(gm)
    shape = tuple(example_inputs.shape)
    teacher = _tag_run(gm, shape, {}, calls)
    maps: dict[str, list[int]] = {}
    edits: list[tuple[str, str, list[int], int]] = []
    regions: list[Region] = []
    pending = {}  # regions route independently: one tag run tries every pending region's width
    for producers in _regions(teacher):
        if not any(p in skip for p in producers):
            widths = [model.get_submodule(p).out_channels for p in producers]
            pending[tuple(producers)] = (widths, _candidates(widths, ratio))
    current = {key: next(c, None) for key, (_, c) in pending.items()}
    while any(ws is not None for ws in current.values()):
        trying = {key: ws for key, ws in current.items() if ws is not None}
        overrides = {p: w for key, ws in trying.items() for p, w in zip(key, ws, strict=True)}
        pruned = _tag_run(gm, shape, overrides, calls)
        failed = {pruned.lanes[i][0] for i in pruned.failed if i in pruned.lanes}
        for key, ws in trying.items():
            group = set(key)
            sigma = None if failed & group else _assign(teacher, pruned, group, importance, model)
            if sigma is None:
                current[key] = next(pending[key][1], None)
                if current[key] is None:
                    log.info("lanes of %s: no width routes like the teacher's; kept", list(key))
                continue
            current[key] = None
            maps.update(sigma)
            edits += _edits(teacher, pruned, sigma, set(key))
            regions.append(Region(list(key), pending[key][0], ws))
    for kind, name, index, channels in edits:
        _apply(model, kind, name, index, channels, maps)
    return maps, regions


def _edits(teacher: _Run, pruned: _Run, sigma, producers) -> list[tuple[str, str, list[int], int]]:
    """(kind, module, teacher channel per student channel, teacher width) for every module the
    region's lanes touch."""
    edits = [("producer", p, sigma[p], 0) for p in producers]
    lane_of = {owner: lane for lane, owner in teacher.lanes.items()}
    for name, slots in pruned.inputs.items():
        owners = [pruned.lanes.get(s) for s in slots]
        if not any(o is not None and o[0] in producers for o in owners):
            continue
        position = {lane: i for i, lane in enumerate(teacher.inputs[name])}
        index = [position[lane_of[(p, sigma[p][j])]] for p, j in owners]
        edits.append((pruned.kinds[name], name, index, len(teacher.inputs[name])))
    return edits


def _apply(model, kind, name, index, channels, maps) -> None:
    module = model.get_submodule(name)
    idx = torch.tensor(index)
    if kind == "producer":
        slice_outputs(module, idx)
    elif kind == "batchnorm":
        slice_batchnorm(module, idx)
    elif kind == "depthwise":
        slice_outputs(module, idx, depthwise=True)
        maps[name] = list(index)
    else:
        slice_inputs(module, list(index), channels)
