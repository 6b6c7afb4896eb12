"""Alignment: which student sites get an adapter, and which teacher value each must match.

A *site* is an affine producer (Conv1d/2d/3d or Linear), optionally followed by an eval
BatchNorm (its *anchor* is the last of the two), then by any per-channel linear *steps*
(identity/eval-dropout modules, axis permutations, a constant per-channel scale such as
ConvNeXt's layer scale), optionally followed by an ``add`` whose other operand (the *residual*)
does not depend on the site. The adapter goes after the anchor; the *point* (the end of the
steps, or the add) is the value compared with the teacher — usually just before a nonlinearity,
but a linear bottleneck's output (MobileNetV2) or a branch before a concat is a point too.
Calibration maps the point's targets back through the steps (inverse permutation, division by
the scale). A producer without BatchNorm that feeds another conv/linear directly is the first
factor of a factorised layer (decoupled depthwise → pointwise), not a site::

    producer ─▶ [BatchNorm] ─▶ ADAPTER ─▶ [+ residual] ─▶ nonlinearity | output
                 anchor ─────┘              point

Two strategies pair student sites with teacher points:

* **mirror** (pruned, slimmed or decoupled students): both graphs have the same ops and edges
  in the same topological order, only widths differ (a conv feeding another conv directly, the
  depthwise half of a decoupled layer, is collapsed into its partner first). Node i of the
  student pairs with node i of the teacher, so every site is matched, inside blocks too.
* **cuts** (any other student): block boundaries are the nodes every input→output path passes
  through (networkx dominators of the output). The student's boundary points and the
  teacher's pre-nonlinearity boundaries are aligned in order by signature (spatial shape,
  channels) with dynamic programming — never by module names — stage by stage: a run of
  boundaries with one signature is a stage, and each student stage's last boundary is matched
  with the teacher stage's output (ResNet-18 against ResNet-34).

A student site may be narrower than its teacher point when a channel map (kept teacher channels)
is known for its producer module: given by the user, recorded by fxkd's student builders, or
inferred from its BatchNorm (kept channels keep their statistics) or, without one, from its
weights (a kept filter is the teacher's restricted to the kept inputs); without one it is skipped,
with the reason recorded. Each pair says where its map came from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from fxkd.capture import node_shape
from fxkd.errors import AlignmentError
from fxkd.nodes import (
    add_operands,
    affine_module,
    channel_step,
    eval_batchnorm,
    is_nonlinearity,
    module_call_counts,
    site_producer,
    spatial_dims,
)

__all__ = [
    "Alignment",
    "Site",
    "SitePair",
    "SkippedSite",
    "align",
    "block_cuts",
    "find_sites",
    "infer_channel_map",
    "infer_channel_map_from_weights",
    "is_mirror",
    "mirror_map",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """A place in the student where an adapter can go (node names of the traced student)."""

    producer: str
    module: str
    batchnorm: str | None
    anchor: str
    point: str
    residual: str | None
    dims: int
    channels: int
    groups: int
    shape: tuple[int, ...]
    channel_dim: int = 1
    steps: tuple[str, ...] = ()


@dataclass(frozen=True)
class SitePair:
    """A student site and the teacher value it must reproduce."""

    site: Site
    teacher_point: str
    teacher_channels: int
    channel_map: tuple[int, ...] | None = None
    map_source: str | None = None


@dataclass(frozen=True)
class SkippedSite:
    """A student producer that gets no adapter, and why."""

    node: str
    reason: str


@dataclass
class Alignment:
    """The result of aligning a teacher with a student: pairs in student topological order."""

    strategy: str
    pairs: list[SitePair] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"Alignment ({self.strategy}): {len(self.pairs)} sites, {len(self.skipped)} skipped"
        ]
        for p in self.pairs:
            cmap = f" map[{len(p.channel_map)}/{p.teacher_channels}]" if p.channel_map else ""
            lines.append(f"  {p.site.point:<24} <- teacher {p.teacher_point}{cmap}")
        for s in self.skipped:
            lines.append(f"  {s.node:<24} skipped: {s.reason}")
        return "\n".join(lines)


def _depends_on(node: fx.Node, ancestor: fx.Node) -> bool:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n is ancestor:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _reaches_activation_or_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    return any(u.op == "output" or is_nonlinearity(gm, u) for u in node.users)


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], list[SkippedSite]]:
    """Every site of a traced, shape-annotated graph, in topological order, and the affine
    producers that are not sites, each with the reason."""
    calls = module_call_counts(gm)
    sites: list[Site] = []
    skipped: list[SkippedSite] = []
    for node in gm.graph.nodes:
        produced = site_producer(gm, node)
        if produced is None:
            continue
        found = _site_of(gm, node, produced, calls[str(produced[2].target)])
        (sites if isinstance(found, Site) else skipped).append(found)
    return _without_shared_seen_through(sites, skipped)


def _site_of(gm: fx.GraphModule, node: fx.Node, produced, calls: int) -> Site | SkippedSite:
    """The site of an affine producer ``node`` (``produced``: its module, qualified name and
    calling node, called ``calls`` times), or why it is none."""
    module, qualname, _ = produced
    if calls > 1:
        return SkippedSite(
            node.name,
            f"module {qualname} is called {calls} times; an adapter folded into it would "
            "change every call",
        )
    dims = spatial_dims(module)
    anchored = _anchor(gm, node, dims)
    if isinstance(anchored, SkippedSite):
        return anchored
    anchor, batchnorm = anchored
    anchor_shape = node_shape(anchor)
    ndim = len(anchor_shape) if anchor_shape is not None else 2
    end, channel_dim, steps = _seen_through(gm, anchor, ndim - 1 if dims == 0 else 1, ndim)
    point, residual = _residual_point(end, anchor)
    if (
        batchnorm is None
        and len(anchor.users) == 1
        and affine_module(gm, next(iter(anchor.users))) is not None
    ):
        return SkippedSite(
            node.name,
            "feeds another conv/linear directly (a factorised layer: the adapter goes after "
            "the last factor)",
        )
    if not point.users:
        return SkippedSite(node.name, "its value is never used")
    shape = node_shape(point)
    if shape is None:
        return SkippedSite(node.name, "no recorded shape (trace with an example)")
    return Site(
        producer=node.name,
        module=qualname,
        batchnorm=batchnorm.name if batchnorm is not None else None,
        anchor=anchor.name,
        point=point.name,
        residual=residual.name if residual is not None else None,
        dims=dims,
        channels=shape[channel_dim],
        groups=getattr(module, "groups", 1),
        shape=shape,
        channel_dim=channel_dim,
        steps=tuple(steps),
    )


def _anchor(gm: fx.GraphModule, node: fx.Node, dims: int):
    """(anchor, batchnorm): the producer's eval BatchNorm when it is the only reader (the
    adapter goes after it), else the producer itself; a SkippedSite when that BatchNorm keeps
    no running statistics (not an affine map in eval mode)."""
    if len(node.users) != 1:
        return node, None
    (user,) = node.users
    if eval_batchnorm(gm, user, dims) is not None:
        return user, user
    if user.op == "call_module" and isinstance(
        gm.get_submodule(str(user.target)), nn.modules.batchnorm._BatchNorm
    ):
        return SkippedSite(
            node.name,
            f"BatchNorm {user.target} keeps no running statistics, so it is not an affine map "
            "in eval mode; give it track_running_stats=True (or fuse it) to calibrate here",
        )
    return node, None


def _seen_through(gm: fx.GraphModule, anchor: fx.Node, channel_dim: int, ndim: int):
    """(end, channel_dim, steps): follow the anchor's single readers while each is a
    per-channel linear step (``channel_step``), tracking where the channels go."""
    end, steps = anchor, []
    while len(end.users) == 1:
        (user,) = end.users
        step = channel_step(gm, user, end, channel_dim, ndim)
        if step is None:
            break
        end, channel_dim = user, step[1]
        steps.append(user.name)
    return end, channel_dim, steps


def _residual_point(end: fx.Node, anchor: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(point, residual): the residual add that alone reads ``end``, when its other operand
    does not depend on the anchor, else ``end`` itself with no residual."""
    if len(end.users) == 1:
        (user,) = end.users
        operands = add_operands(user)
        if operands is not None and operands[0] is not operands[1]:
            other = operands[1] if operands[0] is end else operands[0]
            if not _depends_on(other, anchor):
                return user, other
    return end, None


def _without_shared_seen_through(
    sites: list[Site], skipped: list[SkippedSite]
) -> tuple[list[Site], list[SkippedSite]]:
    """Sites seen through steps to an add another site shares move to ``skipped``: joint
    solves through per-channel steps are not supported."""
    sharing: dict[str, int] = {}
    for site in sites:
        sharing[site.point] = sharing.get(site.point, 0) + 1
    for site in [s for s in sites if s.steps and sharing[s.point] > 1]:
        sites.remove(site)
        skipped.append(
            SkippedSite(
                site.producer,
                f"seen through {', '.join(site.steps)} to an add it shares with another "
                "site; joint solves through per-channel steps are not supported",
            )
        )
    return sites, skipped


def _collapsed(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A conv/linear whose only user is another conv/linear: the first factor of a decoupled
    (depthwise → pointwise) or low-rank pair, one layer of the teacher."""
    if affine_module(gm, node) is None or len(node.users) != 1:
        return False
    (user,) = node.users
    return affine_module(gm, user) is not None


def _structure(gm: fx.GraphModule) -> tuple[list[fx.Node], list[tuple]]:
    """The graph's nodes with factorised layers collapsed, and each one's op kind and input
    positions: equal structures = mirror graphs."""
    rep: dict[fx.Node, fx.Node] = {}
    kept: list[fx.Node] = []
    for n in gm.graph.nodes:
        if _collapsed(gm, n):
            rep[n] = rep.get(n.all_input_nodes[0], n.all_input_nodes[0])
        else:
            rep[n] = n
            kept.append(n)
    index = {n: i for i, n in enumerate(kept)}
    out = []
    for n in kept:
        if n.op == "call_module":
            kind = type(gm.get_submodule(str(n.target)))
        elif n.op in ("call_function", "call_method"):
            kind = n.target
        else:
            kind = None
        out.append((n.op, kind, tuple(index[rep[a]] for a in n.all_input_nodes)))
    return kept, out


def mirror_map(teacher: fx.GraphModule, student: fx.GraphModule) -> dict[str, str] | None:
    """Student node name → teacher node name when the graphs mirror each other (same ops and
    edges in the same order, widths free, decoupled layers collapsed), else None."""
    s_nodes, s_struct = _structure(student)
    t_nodes, t_struct = _structure(teacher)
    if s_struct != t_struct:
        return None
    return {s.name: t.name for s, t in zip(s_nodes, t_nodes, strict=True)}


def is_mirror(teacher: fx.GraphModule, student: fx.GraphModule) -> bool:
    """Whether the student mirrors the teacher (pruned, slimmed or decoupled)."""
    return mirror_map(teacher, student) is not None


def block_cuts(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes every input→output path passes through, in topological order.

    Only nodes reachable from an input and reaching the output form the graph (``get_attr``
    nodes and dead branches would otherwise create bypass paths); the cuts are the dominators of
    the output node from a virtual source feeding every placeholder."""
    g = nx.DiGraph()
    source = "__fxkd_source__"
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            g.add_edge(source, n)
        for a in n.all_input_nodes:
            g.add_edge(a, n)
    if output not in g:
        return []
    live = (nx.descendants(g, source) | {source}) & (nx.ancestors(g, output) | {output})
    g = g.subgraph(live)
    idom = nx.immediate_dominators(g, source)
    cuts = set()
    n = idom[output]
    while n != source:
        cuts.add(n)
        n = idom[n]
    return [n for n in gm.graph.nodes if n in cuts and n.op != "placeholder"]


def _pair(
    site: Site, t_node: fx.Node, channel_maps: Mapping[str, Sequence[int]], source: str = "given"
) -> SitePair | SkippedSite:
    t_shape = node_shape(t_node)
    if t_shape is None or len(t_shape) != len(site.shape):
        return SkippedSite(
            site.producer,
            f"teacher {t_node.name} has shape {t_shape}, student {site.point} {site.shape}",
        )
    t_channels = t_shape[site.channel_dim]
    other = lambda s: tuple(n for i, n in enumerate(s) if i not in (0, site.channel_dim))  # noqa: E731
    if other(t_shape) != other(site.shape):
        return SkippedSite(
            site.producer, f"shape {site.shape} does not match teacher {t_node.name} {t_shape}"
        )
    cmap = channel_maps.get(site.module)
    if cmap is not None:
        cmap = tuple(int(c) for c in cmap)
        if len(cmap) != site.channels or max(cmap) >= t_channels:
            return SkippedSite(
                site.producer,
                f"channel_maps[{site.module!r}] lists {len(cmap)} "
                f"channels (max {max(cmap)}) but the site has {site.channels} and "
                f"the teacher {t_channels}",
            )
        return SitePair(site, t_node.name, t_channels, cmap, source)
    if site.channels != t_channels:
        return SkippedSite(
            site.producer,
            f"width {site.channels} differs from teacher "
            f"{t_node.name} ({t_channels}) and no channel map was given for "
            f"module {site.module!r} (CompressConfig.channel_maps)",
        )
    return SitePair(site, t_node.name, t_channels)


def infer_channel_map(
    teacher: fx.GraphModule, student: fx.GraphModule, site: Site, teacher_bn: fx.Node
) -> tuple[int, ...] | None:
    """Kept teacher channels of a narrower student site pruned elsewhere (no builder map), from
    its BatchNorm: filter pruning keeps each kept channel's BatchNorm (γ, β, mean, variance)
    exactly, so each student channel is the teacher channel with the same four numbers. None
    when the widths are equal, the mirror node is not a BatchNorm, or a match is not unique."""
    s_node = next(n for n in student.graph.nodes if n.name == site.batchnorm)
    s_bn = student.get_submodule(str(s_node.target))
    if teacher_bn.op != "call_module":
        return None
    t_bn = teacher.get_submodule(str(teacher_bn.target))
    if not isinstance(t_bn, type(s_bn)) or t_bn.num_features <= s_bn.num_features:
        return None

    def stats(bn: nn.Module) -> torch.Tensor:
        cols = [bn.running_mean, bn.running_var]
        cols += [p for p in (bn.weight, bn.bias) if p is not None]
        return torch.stack([c.detach().double().cpu() for c in cols], dim=1)

    s_stats, t_stats = stats(s_bn), stats(t_bn)
    if s_stats.shape[1] != t_stats.shape[1]:
        return None
    close = torch.cdist(s_stats, t_stats) <= 1e-6 * (1 + t_stats.abs().amax())
    if not (close.sum(dim=1) == 1).all():
        return None
    kept = tuple(int(j) for j in close.float().argmax(dim=1))
    return kept if len(set(kept)) == len(kept) else None


def _upstream_map(
    student: fx.GraphModule, node: fx.Node, known: Mapping[str, Sequence[int] | None]
) -> tuple[bool, Sequence[int] | None]:
    """The kept input channels of a producer whose input is ``node``: walk back through
    single-input (channel-preserving) nodes and adds to the producer that made them. Returns
    (found, map); map None means all channels (the model input, or an unpruned producer)."""
    while True:
        if node.op == "placeholder":
            return True, None
        module = affine_module(student, node)
        if module is not None:
            return str(node.target) in known, known.get(str(node.target))
        operands = add_operands(node)
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if operands is not None:
            node = operands[0]
        elif len(inputs) == 1:
            node = inputs[0]
        else:
            return False, None


def infer_channel_map_from_weights(
    teacher: fx.GraphModule,
    student: fx.GraphModule,
    site: Site,
    teacher_producer: fx.Node,
    known: Mapping[str, Sequence[int] | None],
) -> tuple[int, ...] | None:
    """Kept teacher channels of a narrower BatchNorm-free site pruned elsewhere, from its
    weights: filter pruning keeps each kept filter as the teacher's filter restricted to the
    kept input channels (those of the producer upstream, already known), so each student
    filter equals exactly one restricted teacher filter. Dense producers and depthwise ones;
    None when widths are equal, the upstream channels are unknown, or a match is not unique."""
    s_node = next(n for n in student.graph.nodes if n.name == site.producer)
    s_mod = affine_module(student, s_node)
    t_mod = affine_module(teacher, teacher_producer)
    if s_mod is None:  # an attention's out_proj: its inputs are internal
        return None
    if t_mod is None or type(t_mod) is not type(s_mod):
        return None
    ws, wt = s_mod.weight.detach().double().cpu(), t_mod.weight.detach().double().cpu()
    if wt.shape[0] <= ws.shape[0] or ws.shape[2:] != wt.shape[2:]:
        return None
    groups = getattr(s_mod, "groups", 1)
    depthwise = groups > 1 and ws.shape[1] == 1 and getattr(t_mod, "groups", 1) == wt.shape[0]
    if groups > 1 and not depthwise:
        return None
    if not depthwise and ws.shape[1] != wt.shape[1]:
        found, in_map = _upstream_map(student, s_node.args[0], known)
        if not found or in_map is None or len(in_map) != ws.shape[1]:
            return None
        wt = wt[:, list(in_map)]
    if ws.shape[1:] != wt.shape[1:]:
        return None
    s_rows, t_rows = ws.flatten(1), wt.flatten(1)
    close = torch.cdist(s_rows, t_rows) <= 1e-6 * (1 + t_rows.abs().amax())
    if not (close.sum(dim=1) == 1).all():
        return None
    kept = tuple(int(j) for j in close.float().argmax(dim=1))
    return kept if len(set(kept)) == len(kept) else None


def _share_maps_at_points(pairs: list[SitePair]) -> list[SitePair | SkippedSite]:
    """Sites that meet at one add share its channels: give a map known for one to all."""
    by_point: dict[str, set] = {}
    for p in pairs:
        by_point.setdefault(p.site.point, set()).add(p.channel_map)
    out: list[SitePair | SkippedSite] = []
    for p in pairs:
        maps = by_point[p.site.point] - {None}
        if len(maps) > 1:
            out.append(
                SkippedSite(
                    p.site.producer,
                    f"sites meeting at {p.site.point} were given different channel maps",
                )
            )
        elif maps and p.channel_map is None:
            (cmap,) = maps
            out.append(SitePair(p.site, p.teacher_point, p.teacher_channels, cmap, "shared"))
        else:
            out.append(p)
    return out


def _run_positions(shapes: list) -> list[tuple[float, bool]]:
    """For each entry of a sequence of shapes: its relative position in its run of equal
    consecutive shapes (0 first .. 1 last) and whether it ends the run (a stage output)."""
    out = []
    start = 0
    for i in range(len(shapes) + 1):
        if i == len(shapes) or shapes[i] != shapes[start]:
            n = i - start
            out += [((k + 1) / n, k == n - 1) for k in range(n)]
            start = i
    return out


def _weighted_lcs(n: int, m: int, weight) -> list[tuple[int, int]]:
    """Order-preserving matching of two sequences maximising the summed ``weight(i, j)``
    (None: incompatible)."""
    best = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            w = weight(i, j)
            take = best[i + 1][j + 1] + w if w is not None else float("-inf")
            best[i][j] = max(take, best[i + 1][j], best[i][j + 1])
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        w = weight(i, j)
        if w is not None and best[i][j] == best[i + 1][j + 1] + w:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif best[i + 1][j] >= best[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


STAGE_OUTPUT_WEIGHT = 1000.0
"""Matching a student stage's last boundary with the teacher stage's output outweighs any
number of inner matches: each stage's output is always corrected to the teacher's."""


def _align_points(
    points: list[str],
    by_point: dict[str, list[Site]],
    t_points: list[fx.Node],
    channel_maps: Mapping[str, Sequence[int]],
    map_source: str,
) -> list[SitePair | SkippedSite]:
    """Stage-anchored matching of the student's boundary points with the teacher's.

    A stage is a run of consecutive boundaries with the same shape (a resolution and width).
    Every student point pairs with one teacher point (all its sites with the same one), in
    order; a student stage's last boundary pairs with the teacher stage's last (its output);
    the boundaries inside a stage spread over the teacher's in proportion (a 2-block stage of
    ResNet-18 against ResNet-34's 3 blocks: block 1 ↔ block 1 or 2, block 2 ↔ block 3)."""
    trial = {
        (i, j): [_pair(s, t, channel_maps, map_source) for s in by_point[p]]
        for i, p in enumerate(points)
        for j, t in enumerate(t_points)
    }
    s_runs = _run_positions([by_point[p][0].shape[1:] for p in points])
    t_runs = _run_positions([node_shape(t)[1:] if node_shape(t) else None for t in t_points])

    def weight(i: int, j: int) -> float | None:
        if not all(isinstance(r, SitePair) for r in trial[i, j]):
            return None
        (si, s_end), (tj, t_end) = s_runs[i], t_runs[j]
        bonus = STAGE_OUTPUT_WEIGHT if (s_end and t_end) else 0.0
        return 1.0 + bonus - 0.1 * abs(si - tj)

    matches = dict(_weighted_lcs(len(points), len(t_points), weight))
    results: list[SitePair | SkippedSite] = []
    for i, p in enumerate(points):
        if i in matches:
            results += trial[i, matches[i]]
        else:
            results += [
                SkippedSite(s.producer, "no teacher block boundary with a matching signature")
                for s in by_point[p]
            ]
    return results


def align(
    teacher: fx.GraphModule,
    student: fx.GraphModule,
    *,
    channel_maps: Mapping[str, Sequence[int]] | None = None,
    granularity: str = "layer",
    map_source: str = "given",
) -> Alignment:
    """Pair the student's sites with teacher points (both graphs traced with shapes).

    ``map_source`` says where the channel maps came from ("given", "builder"); the report shows
    it. Raises AlignmentError, listing both sides' signatures, when no pair at all is found."""
    channel_maps = dict(channel_maps or {})
    _check_channel_map_keys(student, channel_maps)
    sites, skipped = find_sites(student)
    s_cuts = {n.name for n in block_cuts(student)}
    mirror = mirror_map(teacher, student)
    if mirror is not None:
        strategy = "mirror"
        if granularity == "block":
            skipped += [
                SkippedSite(s.producer, "inside a block (granularity='block')")
                for s in sites
                if s.point not in s_cuts
            ]
            sites = [s for s in sites if s.point in s_cuts]
        results = _mirror_pairs(teacher, student, sites, mirror, channel_maps, map_source)
    else:
        strategy = "cuts"
        t_points = [n for n in block_cuts(teacher) if _reaches_activation_or_output(teacher, n)]
        skipped += [
            SkippedSite(s.producer, "not at a block boundary of a non-mirror student")
            for s in sites
            if s.point not in s_cuts
        ]
        by_point: dict[str, list[Site]] = {}
        for site in (s for s in sites if s.point in s_cuts):
            by_point.setdefault(site.point, []).append(site)
        results = _align_points(list(by_point), by_point, t_points, channel_maps, map_source)
    pairs = [r for r in results if isinstance(r, SitePair)]
    skipped += [r for r in results if isinstance(r, SkippedSite)]
    shared = _share_maps_at_points(pairs)
    pairs = [r for r in shared if isinstance(r, SitePair)]
    skipped += [r for r in shared if isinstance(r, SkippedSite)]
    if not pairs:
        raise AlignmentError(
            "teacher and student share no alignable block boundary.\n"
            f"  student sites: {[(s.point, s.shape) for s in sites] or 'none'}\n"
            f"  teacher boundaries: "
            f"{[(n.name, node_shape(n)) for n in block_cuts(teacher)] or 'none'}\n"
            + "".join(f"  skipped {s.node}: {s.reason}\n" for s in skipped)
            + "Hint: the student needs conv/linear layers whose outputs match teacher shapes "
            "(give channel_maps for pruned layers)."
        )
    for s in skipped:
        log.info("site %s skipped: %s", s.node, s.reason)
    return Alignment(strategy, pairs, skipped)


def _check_channel_map_keys(student: fx.GraphModule, channel_maps: Mapping) -> None:
    """AlignmentError when ``channel_maps`` names a module that is no conv/linear producer."""
    producers = {
        p[1] for p in (site_producer(student, n) for n in student.graph.nodes) if p is not None
    }
    unknown = sorted(set(channel_maps) - producers)
    if unknown:
        raise AlignmentError(
            f"channel_maps names {unknown}, which are not conv/linear modules of the student. "
            "Hint: key channel maps by the student's producer module name (e.g. 'features.0')."
        )


def _mirror_pairs(teacher, student, sites, mirror, channel_maps, map_source) -> list:
    """A mirror student's sites paired node by node with the teacher's; a pruned site without
    a given channel map gets one inferred from the BatchNorm statistics, else from the weights
    (each inferred map feeding its consumers' inference)."""
    t_nodes = {n.name: n for n in teacher.graph.nodes}
    results = []
    known: dict[str, Sequence[int] | None] = dict(channel_maps)
    for s in sites:
        t_node = t_nodes[mirror[s.point]]
        if s.module not in channel_maps:
            inferred, how = None, ""
            if s.batchnorm is not None:
                bn = t_nodes[mirror[s.batchnorm]]
                inferred, how = infer_channel_map(teacher, student, s, bn), "inferred"
            if inferred is None:
                t_producer = t_nodes[mirror[s.producer]]
                inferred = infer_channel_map_from_weights(teacher, student, s, t_producer, known)
                how = "inferred-weights"
            if inferred is not None:
                known[s.module] = inferred
                results.append(_pair(s, t_node, {s.module: inferred}, how))
                continue
        result = _pair(s, t_node, channel_maps, map_source)
        if isinstance(result, SitePair) and result.channel_map is None:
            known[s.module] = None  # full width: its consumers see every channel
        results.append(result)
    return results
