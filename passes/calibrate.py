"""CalibrateAdapters: solve every adapter in closed form, block by block, in one forward pass of
each network.

For the adapters meeting at a point P (one, or two at a residual ``add``), with the student's own
already-corrected features X at the site, the teacher's value Y at the matched point (restricted
to the student's kept channels) and the student's residual R::

    W* = argmin Σ ||X W + c − (Y − R)||²  (+ ridge towards the student as it is)

pointwise mode: X is the site's value (C channels per position), W the 1x1 ``Q``;
kernel mode: X is the producer's input patches (im2col), W the producer's whole kernel.
Both are per group of the producer (block-diagonal ``Q`` / grouped kernel).

The teacher and the student run node by node in lockstep (GraphRunner): the student stops at
each point, the teacher advances to the matched point, the normal equations accumulate over all
sample chunks, the solve happens, the adapters are applied to the held values, and both go on.
Each network therefore runs exactly once over the samples, whatever the number of blocks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult
from tqdm.auto import tqdm

from fxkd.align import SitePair
from fxkd.capture import eval_mode, trace
from fxkd.config import CompressConfig
from fxkd.errors import CalibrationError
from fxkd.inputs import Inputs
from fxkd.nodes import clamp_bounds, redo_steps, undo_steps
from fxkd.passes.memory import MemoryEstimate, check_fits
from fxkd.passes.memory import estimate as estimate_memory
from fxkd.placement import full_precision, module_device, module_dtype
from fxkd.solve.crossval import FOLDS, FoldedEquations
from fxkd.solve.fold import compose_pointwise, effective_affine
from fxkd.solve.normal import Conditioning, NormalEquations, all_reduce_sum
from fxkd.solve.patches import blocks, patch_blocks
from fxkd.solve.projection import producer_input
from fxkd.solve.relax import relaxed_targets

from .adapter import KernelAdapter, PointwiseAdapter, adapter_points
from .base import FxkdPass
from .fold import batchnorm_folded_view
from .runner import GraphRunner
from .select import select_channel_maps

__all__ = [
    "CalibrateAdapters",
    "SiteRecord",
    "adapter_groups",
    "all_finite",
    "projected_sources",
    "relative_error",
]

log = logging.getLogger(__name__)


@dataclass
class SiteRecord:
    """What calibration measured at one adapter (relative squared errors on the samples).

    err_given: the student as given; err_before: this site with an identity adapter, fed by the
    already-corrected student; err_after: after the solve. conditioning: how well the samples
    determine the solve (dead/dependent features, condition bound; ``.ill`` flags trouble).
    relaxed: the clamp (lo, hi) the targets were relaxed through, and the errors measured
    after it; None when the point's own value was fitted. ridge: the relative ridge chosen by
    cross-validation (``ridge="cv"``), else None (the configured one)."""

    adapter: str
    err_given: float | None
    err_before: float
    err_after: float
    rows: int
    unknowns: int
    solved_as: str = ""
    conditioning: Conditioning | None = None
    relaxed: tuple[float, float] | None = None
    ridge: float | None = None


@dataclass
class _Member:
    """One adapter of a solve point. ``pointwise`` says which system it is solved with: a
    KernelAdapter whose kernel system would be underdetermined (fewer sample rows than
    unknowns, e.g. a classifier head on 100 samples) is solved pointwise and carries ``Q·A``."""

    node: fx.Node
    module: PointwiseAdapter | KernelAdapter
    producer: nn.Module
    batchnorm: nn.Module | None
    source: fx.Node | None = None  # the producer's input, when a pointwise system is cheaper
    pointwise: bool = False

    def __post_init__(self) -> None:
        self.pointwise = isinstance(self.module, PointwiseAdapter)

    def kernel_unknowns(self) -> int:
        return self.producer.weight[0].numel() + int(self.bias)

    def feature_size(self) -> int:
        """D, the features per group of the system this member is solved with."""
        if self.pointwise:
            return self.module.pair.site.channels // self.groups
        return self.producer.weight[0].numel()

    @property
    def projected(self) -> bool:
        """Solved pointwise from sums over the producer's input, mapped through the producer
        (``fxkd.solve.projection``)."""
        return self.pointwise and self.source is not None

    @property
    def holds_source(self) -> bool:
        """A projected pointwise adapter: the student's runner holds its producer's input
        until the solve (a KernelAdapter reads that input anyway), and the adapter is applied
        through the producer."""
        return isinstance(self.module, PointwiseAdapter) and self.source is not None

    def accumulated_size(self) -> int:
        """Features per group whose sums are accumulated: the producer's inputs when
        projected, else ``feature_size``."""
        return self.producer.weight[0].numel() if self.projected else self.feature_size()

    def mapping(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, a) in fp64 on ``device`` with ``x = A h + a``: the site's value from the
        accumulated features (the producer's input when projected, else the value itself:
        identity, zero)."""
        if self.projected:
            a_mat, a_vec = effective_affine(self.producer, self.batchnorm)
            return a_mat.reshape(a_mat.shape[0], -1).to(device), a_vec.to(device)
        d = self.feature_size()
        z = {"dtype": torch.float64, "device": device}
        return torch.eye(d, **z), torch.zeros(d, **z)

    @property
    def groups(self) -> int:
        return self.module.pair.site.groups

    @property
    def bias(self) -> bool:
        return self.producer.bias is not None or self.batchnorm is not None

    def features(self, runner: GraphRunner, i: int, sl: slice = slice(None)) -> torch.Tensor:
        """(B, groups, D, L) features of samples ``sl`` of chunk i, feature-major (rows =
        B·L): the accumulated ones (``accumulated_size``)."""
        if self.projected:
            return patch_blocks(runner.chunk(self.source, i)[sl], self.producer)
        if not self.pointwise:
            return patch_blocks(runner.chunk(self.node.args[1], i)[sl], self.producer)
        return blocks(runner.chunk(self.node.args[0], i)[sl], self.module.dims, self.groups)

    def prior(self) -> torch.Tensor:
        """(groups, D[+1], K): the student as it is, what the ridge shrinks towards."""
        g = self.groups
        if not self.pointwise:
            a_mat, a_vec = effective_affine(self.producer, self.batchnorm)
            k = a_mat.shape[0] // g
            w = a_mat.reshape(g, k, -1).transpose(1, 2)
        else:
            k = self.module.pair.site.channels // g
            w = torch.eye(k, dtype=torch.float64).expand(g, k, k)
            a_vec = torch.zeros(g * k, dtype=torch.float64)
        if self.bias:
            w = torch.cat([w, a_vec.reshape(g, 1, k).to(w)], dim=1)
        return w

    def write(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Store a (groups, D, K) solution (and a (C,) bias) in the adapter."""
        g, d, k = w.shape
        weight = w.transpose(1, 2).reshape(g * k, d)
        if isinstance(self.module, KernelAdapter) and self.pointwise:  # carry Q·A, Q·a + c
            a_mat, a_vec = effective_affine(self.producer, self.batchnorm)
            a_mat, a_vec = compose_pointwise(a_mat, a_vec, weight, bias, g)
            self.module.set_kernel(
                a_mat.to(self.producer.weight),
                a_vec.to(self.producer.weight) if self.bias else None,
            )
        elif isinstance(self.module, KernelAdapter):
            weight = weight.reshape(self.producer.weight.shape)
            self.module.set_kernel(
                weight.to(self.producer.weight),
                None if bias is None else bias.to(self.producer.weight),
            )
        else:
            with torch.no_grad():
                self.module.weight.copy_(weight)
                if self.module.bias is not None and bias is not None:
                    self.module.bias.copy_(bias)


@dataclass
class _Lockstep:
    """One calibration's running state: the runners of the teacher (advanced to each matched
    point), the student (stopped at each site) and, when asked, the student as given (for the
    report's ``err_given``); the nodes still waiting for their solve; where and in which dtype
    the normal equations are formed."""

    teacher: GraphRunner
    student: GraphRunner
    reference: GraphRunner | None
    pending: set[fx.Node]
    device: torch.device
    dtype: torch.dtype


class CalibrateAdapters(FxkdPass):
    """Solve the adapters of a student GraphModule against ``teacher`` on ``samples``.

    ``teacher`` is the GraphModule the alignment was made on (or the module, traced here with
    ``config.leaf_modules``); ``reference``, optional, is the traced student as given, run along
    to report its error at every point. In kernel mode with ``config.select_channels`` the
    internal sites' channel maps are first chosen from the samples (``fxkd.passes.select``;
    the changed pairs, written into their adapters, are in ``self.selected``). Results per
    adapter are in ``self.records``; the memory
    estimate checked before the run in ``self.memory`` (MemoryBudgetError when it cannot fit),
    the bytes each runner actually held at its peak in ``self.peak_held``."""

    def __init__(
        self,
        teacher: nn.Module,
        samples: torch.Tensor | Inputs,
        config: CompressConfig | None = None,
        reference: fx.GraphModule | None = None,
    ) -> None:
        self.config = config or CompressConfig()
        self.teacher = (
            teacher
            if isinstance(teacher, fx.GraphModule)
            else trace(teacher, leaf_modules=self.config.leaf_modules)
        )
        self.samples = Inputs.of(samples)
        self.reference = reference
        self.records: dict[str, SiteRecord] = {}
        self.memory: MemoryEstimate | None = None
        self.peak_held: dict[str, int] = {}
        self._ridges: dict[fx.Node, float | None] = {}
        self.selected: dict[str, SitePair] = {}

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        groups = adapter_groups(gm)
        if not groups:
            return PassResult(gm, False)
        device = torch.device(self.config.device) if self.config.device else module_device(gm)
        t_nodes = {n.name: n for n in self.teacher.graph.nodes}
        missing = [
            m.module.pair.teacher_point
            for ms in groups.values()
            for m in ms
            if m.module.pair.teacher_point not in t_nodes
        ]
        if missing:
            raise CalibrationError(
                f"teacher nodes {missing} not found: the teacher given to CalibrateAdapters is "
                "not the graph the alignment was made on. Hint: pass the same traced teacher."
            )
        t_view = self._teacher_view(groups)
        t_nodes = {n.name: n for n in t_view.graph.nodes}
        r_view = None
        if self.reference is not None:
            sites = {ms[0].module.pair.site.point for ms in groups.values()}
            r_view = batchnorm_folded_view(self.reference, keep=sites)
        shard = _shard(self.samples)
        self.memory = estimate_memory(t_view, gm, len(shard), self.config, reference=r_view)
        check_fits(self.memory, self.config)
        self.selected = self._select_channels(gm, groups, shard)
        chunks = list(shard.split(self.config.chunk_size))
        targets = [t_nodes[ms[0].module.pair.teacher_point] for ms in groups.values()]
        offload = self.config.offload
        teacher = GraphRunner(
            t_view,
            [c.to(dtype=module_dtype(self.teacher)) for c in chunks],
            pinned=targets,
            device=module_device(self.teacher),
            offload=offload,
        )
        self._sources = projected_sources(groups.values())
        student = GraphRunner(
            gm,
            [c.to(dtype=module_dtype(gm)) for c in chunks],
            pinned=self._sources,
            device=device,
            offload=offload,
        )
        dtype = torch.float64 if module_dtype(gm) == torch.float64 else torch.float32
        reference = None
        if r_view is not None:
            r_nodes = {n.name: n for n in r_view.graph.nodes}
            reference = GraphRunner(
                r_view,
                [c.to(dtype=module_dtype(self.reference)) for c in chunks],
                device=module_device(self.reference),
                offload=offload,
            )
            reference.pinned = {r_nodes[ms[0].module.pair.site.point] for ms in groups.values()}
        # adapters not solved yet, and the seen-through steps after them, wait for their solve
        pending = {m.node for ms in groups.values() for m in ms}
        pending |= {
            student.by_name[name]
            for ms in groups.values()
            for m in ms
            for name in m.module.pair.site.steps
        }
        run = _Lockstep(teacher, student, reference, pending, device, dtype)
        models = [m for m in (self.teacher, gm, self.reference) if m is not None]
        self.records = {}
        with torch.no_grad(), eval_mode(*models), full_precision():
            for point, members in tqdm(
                groups.items(),
                desc="fxkd calibrate",
                unit="block",
                disable=not self.config.progress,
            ):
                target_node = t_nodes[members[0].module.pair.teacher_point]
                self._solve(run, point, members, target_node)
                teacher.unpin(target_node)
        self.peak_held = {
            name: r.peak_bytes
            for name, r in (("teacher", teacher), ("student", student), ("reference", reference))
            if r is not None
        }
        return PassResult(gm, True)

    def _select_channels(self, gm, groups, samples) -> dict[str, SitePair]:
        """In kernel mode with ``config.select_channels``: the internal sites' channel maps
        chosen from the samples (``fxkd.passes.select``), written into their adapters' pairs;
        returns the changed pairs by student module."""
        if not (self.config.select_channels and self.config.mode == "kernel"):
            return {}
        adapters = [m.module for ms in groups.values() for m in ms]
        pairs = [a.pair for a in adapters]
        chosen = select_channel_maps(self.teacher, gm, pairs, samples, self.config)
        selected = {}
        for adapter, old, new in zip(adapters, pairs, chosen, strict=True):
            if new is not old:
                adapter.pair = new
                selected[new.site.module] = new
        return selected

    def _teacher_view(self, groups) -> fx.GraphModule:
        """The teacher as calibration runs it: BatchNorms folded into their convs (a cheaper
        forward), since only its values at the matched points are read, by name, and the view
        keeps those. The student as given runs the same way."""
        points = {m.module.pair.teacher_point for ms in groups.values() for m in ms}
        return batchnorm_folded_view(self.teacher, keep=points)

    def _solve(self, run: _Lockstep, point: fx.Node, members: list[_Member], target_node):
        """Solve the adapters that meet at ``point`` against the teacher's ``target_node``, then
        run the student through them and record each member's errors."""
        teacher, student, reference = run.teacher, run.student, run.reference
        pending, device, dtype = run.pending, run.device, run.dtype
        student.run_until(point, defer=pending)
        pair = members[0].module.pair
        cmap = (
            torch.tensor(pair.channel_map, device=device) if pair.channel_map is not None else None
        )
        channel_dim = pair.site.channel_dim
        teacher.run_through(target_node)
        targets = _Targets(teacher, target_node, device, dtype, cmap, channel_dim)
        if not self.config.offload:  # held on the device anyway: convert once
            targets = list(targets)
        member_nodes = {m.node for m in members}
        steps = [student.by_name[n] for n in pair.site.steps]
        own = member_nodes | set(steps)  # the point's operands that the adapters produce
        residual = [a for a in point.all_input_nodes if a not in own]
        residual_node = residual[0] if point not in own and residual else None
        share = self.config.subsample if members[0].module.dims > 0 else 1.0
        sample_rows = _global_rows(teacher.value(target_node), channel_dim, share)
        for m in members:
            if not m.pointwise and sample_rows < m.kernel_unknowns():
                m.pointwise = True
                log.info(
                    "%s: %d rows for %d kernel unknowns: solved pointwise",
                    m.node.name,
                    sample_rows,
                    m.kernel_unknowns(),
                )
        bounds = clamp_bounds(student.gm, point) if self.config.relax_rounds else None
        if len(members) == 1 or all(m.groups == 1 for m in members):
            rows_seen, unknowns, cond, identity, eqs = self._solve_jointly(
                student, members, residual_node, targets, steps, bounds=bounds
            )
            for _ in range(self.config.relax_rounds if bounds is not None else 0):
                relaxed = self._relaxed_targets(student, members, residual_node, targets, steps,
                                                bounds)  # fmt: skip
                # same rows, new targets: only the cross products are taken again
                self._solve_jointly(student, members, residual_node, relaxed, steps,
                                    identity=False, gram_of=eqs)  # fmt: skip
        else:  # residual add of grouped producers: block-coordinate descent over the members
            rows_seen = unknowns = 0
            conds, identity = [], None
            for m in members:
                others = [o for o in members if o is not m]
                rows_seen, u, c, sums, _ = self._solve_jointly(
                    student, [m], residual_node, targets, steps, extra=others,
                    identity=identity is None, bounds=None,
                )  # fmt: skip
                identity = sums if identity is None else identity
                unknowns += u
                conds.append(c)
            cond = Conditioning.combine(conds)
            bounds = None  # (grouped members at an add: fitted before the nonlinearity)
        err_before, energy = _ratio(identity)
        for m in members:
            pending.discard(m.node)
            student.run_node(m.node, via=_through_producer(m, student))
        for m in members:  # a projected member's input is read no more
            if m.holds_source:
                self._sources[m.source] -= 1
                if not self._sources[m.source]:
                    student.unpin(m.source)
        for step in steps:
            pending.discard(step)
            student.run_node(step)
        if point not in own:
            student.run_node(point)
        err_after = relative_error(student.value(point), targets, energy, bounds)
        err_given = None
        if reference is not None:
            r_node = next(n for n in reference.nodes if n.name == pair.site.point)
            err_given = relative_error(reference.run_through(r_node), targets, energy, bounds)
            reference.unpin(r_node)
        for m in members:
            self.records[str(m.node.target)] = SiteRecord(
                str(m.node.target),
                err_given,
                err_before,
                err_after,
                rows_seen,
                unknowns,
                "pointwise" if m.pointwise else "kernel",
                cond,
                bounds,
                self._ridges.get(members[0].node),
            )
        log.debug("%s: rel err %.4g -> %.4g", point.name, err_before, err_after)

    def _relaxed_targets(self, student, members, residual_node, targets, steps, bounds):
        """The feasible targets closest to the point's current value (``fxkd.solve.relax``),
        chunk by chunk: the members' adapters (as solved so far) on their held inputs,
        through the seen-through steps, plus the residual."""
        relaxed = []
        for i, t in enumerate(targets):
            v = sum(m.module(*[student.chunk(a, i) for a in m.node.args]) for m in members)
            value = redo_steps(student.gm, steps, v).to(t)
            if residual_node is not None:
                value = value + student.chunk(residual_node, i).to(t)
            relaxed.append(relaxed_targets(t, value, *bounds))
        return relaxed

    def _solve_jointly(
        self, student, members, residual_node, targets, steps, extra=(), identity=True,
        bounds=None, gram_of=None,
    ):  # fmt: skip
        """One least-squares system over the members' features (concatenated when several).
        With ``identity``, the same sweep also sums the point's error with identity adapters
        (the already-corrected student's input) and the targets' energy Σ||y||², what every
        error at this point is relative to (returned as ``_accumulate``'s sums, else None);
        with clamp ``bounds``, both after the clamp. ``gram_of``: the system of an earlier
        solve over the same rows, whose Gram (and diagnosis) this one reuses, taking only the
        cross products against the new targets (``NormalEquations.retargeted``). Returns
        (rows, unknowns, conditioning, sums, the system).

        The sweep goes over sample slices small enough for a core's cache on a CPU (the whole
        chunk elsewhere), so y − r, the identity difference, the shifted GEMM operands and the
        patches of one slice are made and consumed without a trip to memory."""
        eqs, sums = self._accumulate(student, members, residual_node, targets, steps, extra,
                                     identity, bounds, gram_of)  # fmt: skip
        bias = eqs.bias
        accumulated = sum(m.accumulated_size() for m in members)
        projected = any(m.projected for m in members)
        mapping, tiles = _mapping(members, bias, eqs.device) if projected else (None, [])
        if not (all_finite(eqs.gram) and (mapping is None or all_finite(mapping))):
            raise CalibrationError(
                _non_finite(f"student features at {members[0].node.args[0].name}")
            )
        if not all_finite(eqs.cross):
            raise CalibrationError(
                _non_finite(f"teacher node {members[0].module.pair.teacher_point} or a residual")
            )
        if mapping is not None:  # solved at the narrow side (fxkd.solve.narrow)
            eqs.project(mapping, tiles)
        unknowns = eqs.features + int(eqs.bias)
        if gram_of is not None:  # the same Gram: diagnosed and reported at the first solve
            self._write_solution(eqs, members)
            return eqs.rows, unknowns, None, sums, eqs
        conditioning = eqs.conditioning()
        if conditioning.ill:
            log.info("%s: ill-conditioned features: %s", members[0].node.name, conditioning)
        # what samples can determine: a projected system's features span its producer's
        # inputs only (the ridge decides the other directions however many rows there are),
        # and a kernel too large for the rows was already solved pointwise (_solve)
        determinable = accumulated + int(bias)
        if eqs.rows < determinable:
            log.warning(
                "%s: %d sample rows for %d unknowns per output; the ridge decides the rest "
                "(more samples would determine it)",
                members[0].node.name,
                eqs.rows,
                determinable,
            )
        self._write_solution(eqs, members)
        return eqs.rows, unknowns, conditioning, sums, eqs

    def _accumulate(
        self, student, members, residual_node, targets, steps, extra, identity, bounds,
        gram_of=None,
    ) -> tuple[NormalEquations, torch.Tensor | None]:  # fmt: skip
        """The members' normal equations over every chunk (and, with ``identity``, the
        identity adapters' error sums; see ``_solve_jointly``), reduced over ranks."""
        g = members[0].groups
        dims = members[0].module.dims
        bias = any(m.bias for m in members)
        accumulated = sum(m.accumulated_size() for m in members)
        channels = members[0].module.pair.site.channels
        folds = self._folds(members, targets)
        if gram_of is not None:
            eqs = gram_of.retargeted()
        elif folds > 1:  # ridge="cv": one system per fold of the samples
            eqs = FoldedEquations.empty(
                folds, g, accumulated, channels // g, bias=bias, device=targets[0].device
            )
        else:
            eqs = NormalEquations(
                g, accumulated, channels // g, bias=bias, device=targets[0].device
            )
        subsample = self.config.subsample < 1.0 and dims > 0
        # one conv solved by its kernel: patches built centred, in GEMM layout (update_patches)
        conv_patches = len(members) == 1 and not members[0].pointwise and dims > 0 and not subsample
        sums = None
        total = sum(len(t) for t in targets)
        start = 0
        for i, y_chunk in enumerate(targets):
            pieces = _fold_pieces(y_chunk, start, total, folds, whole=subsample)
            start += len(y_chunk)
            for fold, sl in pieces:
                into = eqs.fold(fold) if folds > 1 else eqs
                y_target = y_chunk[sl]
                y = y_target
                if residual_node is not None:
                    y = y - student.chunk(residual_node, i)[sl]
                if identity:  # (y − r) − Σ site values, through the seen-through steps
                    v = student.chunk(members[0].node.args[0], i)[sl]
                    for m in [*members[1:], *extra]:
                        v = v + student.chunk(m.node.args[0], i)[sl]
                    diff = y - redo_steps(student.gm, steps, v).to(y)
                    if bounds is None:
                        sums = _accumulate(sums, diff, y_target)
                    else:  # the value is y_target − diff; both seen through the clamp
                        seen = y_target.clamp(*bounds)
                        value = (y_target - diff).clamp(*bounds)
                        sums = _accumulate(sums, seen - value, seen)
                for o in extra:  # other members held fixed at their current output
                    y = y - o.module(*[student.chunk(a, i)[sl] for a in o.node.args])
                y = blocks(undo_steps(student.gm, steps, y), dims, g)
                if conv_patches:
                    x_in = student.chunk(members[0].node.args[1], i)[sl]
                    into.update_patches(x_in, members[0].producer, y)
                    continue
                feats = [m.features(student, i, sl) for m in members]
                feats = feats[0] if len(feats) == 1 else torch.cat(feats, dim=2)
                if subsample:
                    keep = _positions(y.shape[-1], self.config.subsample, (self.config.seed, i))
                    keep = keep.to(y.device)
                    feats, y = feats.index_select(-1, keep), y.index_select(-1, keep)
                into.update_blocks(feats, y)
        eqs.all_reduce()
        return eqs, sums

    def _folds(self, members: list[_Member], targets) -> int:
        """How many systems a solve accumulates: ``FOLDS`` for ``ridge="cv"`` (one per fold of
        the samples), else one. A projected system, or fewer than two samples per fold, takes
        the mode's default ridge instead."""
        if self.config.ridge != "cv" or any(m.projected for m in members):
            return 1
        return FOLDS if sum(len(t) for t in targets) >= 2 * FOLDS else 1

    def _write_solution(self, eqs: NormalEquations, members: list[_Member]) -> None:
        """Solve ``eqs`` (a ridge towards the members' current weights) and write each
        member's share of the solution into its adapter."""
        bias = eqs.bias
        sizes = [m.feature_size() for m in members]
        priors = [m.prior().to(eqs.device) for m in members]
        prior = torch.cat([p[:, :s] for p, s in zip(priors, sizes, strict=True)], dim=1)
        if bias:
            bias_row = next((p[:, -1:] for p, m in zip(priors, members, strict=True) if m.bias))
            prior = torch.cat([prior, bias_row], dim=1)
        if isinstance(eqs, FoldedEquations):
            w = eqs.solve(None, prior)  # the ridge chosen by cross-validation
            self._ridges[members[0].node] = eqs.ridge
        else:
            w = eqs.solve(self.config.fixed_ridge, prior)
        # one bias was solved for the point: members after the first keep their own (current)
        # shift and the first takes the rest, so no member's shift is zeroed needlessly
        biases: dict[int, torch.Tensor] = {}
        if bias:
            carriers = [
                (m, p[:, -1, :].reshape(-1)) for m, p in zip(members, priors, strict=True) if m.bias
            ]
            kept = sum((own for _, own in carriers[1:]), torch.zeros_like(carriers[0][1]))
            biases = {id(m): own for m, own in carriers[1:]}
            biases[id(carriers[0][0])] = w[:, -1, :].reshape(-1) - kept
        offset = 0
        for m, size in zip(members, sizes, strict=True):
            m.write(w[:, offset : offset + size], biases.get(id(m)))
            offset += size


def _through_producer(member: _Member, student: GraphRunner):
    """For a projected pointwise adapter, its value from the producer's input: ``Q x + c`` with
    ``x = A h + a`` is ``(Q·A) h + (Q·a + c)``, the producer with the folded weights — C·C_in
    multiply-adds per position instead of the adapter's C² (8× fewer at a resnet50 bottleneck
    output), and the values the folded student computes. None for the other members."""
    if not member.holds_source:
        return None
    producer, adapter = member.producer, member.module
    a_mat, a_vec = effective_affine(producer, member.batchnorm)
    bias = adapter.bias.detach() if adapter.bias is not None else None
    weight, shift = compose_pointwise(a_mat, a_vec, adapter.weight.detach(), bias, 1)
    weight, shift = weight.to(producer.weight), shift.to(producer.weight)  # once, not per chunk
    if isinstance(producer, nn.Linear):
        apply = F.linear
    else:
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(producer.kernel_size) - 1]

        def apply(h, w, b):
            return conv(h, w, b, producer.stride, 0, producer.dilation)

    def value(i: int) -> torch.Tensor:
        return apply(student.chunk(member.source, i), weight, shift)

    return value


def projected_sources(member_lists) -> dict[fx.Node, int]:
    """The inputs that projected pointwise adapters read at their solve (so the student's
    runner holds them until then), with how many adapters read each."""
    sources: dict[fx.Node, int] = {}
    for m in (m for ms in member_lists for m in ms):
        if m.holds_source:
            sources[m.source] = sources.get(m.source, 0) + 1
    return sources


def _mapping(
    members: list[_Member], bias: bool, device: torch.device
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(1, D[+1], D_acc[+1]) fp64 on ``device`` (the normal equations'): the members' features
    (concatenated) from the accumulated ones, ``[x 1] = M [h 1]``: block-diagonal A's, the
    shifts a in the bias column; with the blocks' sizes (rows, columns). Built where it is
    used: on a GPU, assembling it on the host cost a device-to-host copy per block (a sync)
    and a copy back (resnet50 layer4's: 4,097 × 1,281 fp64, 42 MB)."""
    maps = [m.mapping(device) for m in members]
    rows = sum(a.shape[0] for a, _ in maps) + int(bias)
    cols = sum(a.shape[1] for a, _ in maps) + int(bias)
    out = torch.zeros(rows, cols, dtype=torch.float64, device=device)
    r = c = 0
    for a_mat, a_vec in maps:
        out[r : r + a_mat.shape[0], c : c + a_mat.shape[1]] = a_mat
        if bias:
            out[r : r + a_mat.shape[0], -1] = a_vec
        r, c = r + a_mat.shape[0], c + a_mat.shape[1]
    if bias:
        out[-1, -1] = 1.0
    return out[None], [tuple(a.shape) for a, _ in maps]


def adapter_groups(gm: fx.GraphModule) -> dict[fx.Node, list[_Member]]:
    """Adapters grouped by the point where they are solved, in topological order."""
    groups: dict[fx.Node, list[_Member]] = {}
    for node, module, point in adapter_points(gm):
        site = module.pair.site
        if point is None:
            raise CalibrationError(f"point {site.point} of adapter {node.name} is not in the graph")
        anchor = node.args[0]
        bn = None
        if anchor.name == site.batchnorm:
            bn = gm.get_submodule(str(anchor.target))
            anchor = anchor.args[0]
        producer = gm.get_submodule(site.module)
        source = producer_input(gm, node, module)
        groups.setdefault(point, []).append(_Member(node, module, producer, bn, source))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return dict(sorted(groups.items(), key=lambda kv: order[kv[0]]))


def relative_error(
    values: list[torch.Tensor],
    targets: list[torch.Tensor],
    energy: float,
    bounds: tuple[float, float] | None = None,
) -> float:
    """``Σ||y − v||² / energy`` over chunks (and over ranks when torch.distributed runs), with
    ``energy`` = Σ||y||² (global), measured once per point with the identity error; with clamp
    ``bounds``, of the clamped values (what the nonlinearity reading the point passes on)."""
    sums = None
    for v, y in zip(values, targets, strict=True):
        for sl in _slices(y):
            if bounds is None:
                sums = _accumulate(sums, y[sl] - v[sl].to(y), None)
            else:
                seen, value = y[sl].clamp(*bounds), v[sl].to(y).clamp(*bounds)
                sums = _accumulate(sums, seen - value, None)
    return float(all_reduce_sum(sums)[0]) / max(energy, 1e-300)


SLICE_BYTES = 1 << 21
"""Bytes of one target slice in the CPU sweeps: a few such tensors fit a core's L2 cache."""


def _slices(chunk: torch.Tensor) -> list[slice]:
    """Sample ranges of a chunk that the sweeps take at a time: on a CPU, as many samples as
    keep one slice of the point's value within ``SLICE_BYTES`` (at least one), so temporaries
    stay in cache (y − r, differences, shifted GEMM operands; measurably faster than
    whole-chunk passes, docs/performance.md); elsewhere the whole chunk, one kernel per op."""
    n = chunk.shape[0] if chunk.dim() else 1
    if chunk.device.type != "cpu" or chunk.dim() < 2 or n <= 1:
        return [slice(None)]
    per = max(1, SLICE_BYTES // max(1, chunk[0].numel() * chunk.element_size()))
    return [slice(s, s + per) for s in range(0, n, per)]


def _fold_pieces(chunk: torch.Tensor, start: int, total: int, folds: int, whole: bool = False):
    """(fold, sample slice) pieces of a chunk whose first sample is sample ``start`` of
    ``total``: sample s belongs to fold ``s·folds // total`` (contiguous folds of the samples),
    each fold's share cut further into ``_slices`` (or kept whole with ``whole``)."""
    n = len(chunk)
    out = []
    lo = 0
    while lo < n:
        fold = (start + lo) * folds // total
        hi = min(n, -(-(fold + 1) * total // folds) - start)  # first sample of the next fold
        part = chunk[lo:hi]
        inner = [slice(None)] if whole else _slices(part)
        for sl in inner:
            a, b, _ = sl.indices(hi - lo)
            out.append((fold, slice(lo + a, lo + b)))
        lo = hi
    return out


def _accumulate(sums, diff: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Running [Σ||diff||², Σ||y||²] on the targets' device: no host sync per chunk."""
    if sums is None:
        sums = torch.zeros(2, dtype=torch.float64, device=diff.device)
    sums[0] += torch.linalg.vector_norm(diff).double() ** 2
    if y is not None:
        sums[1] += torch.linalg.vector_norm(y).double() ** 2
    return sums


def _ratio(sums: torch.Tensor) -> tuple[float, float]:
    """(Σ||diff||² / Σ||y||², Σ||y||²), summed over ranks: one synchronisation."""
    sums = all_reduce_sum(sums).tolist()
    return sums[0] / max(sums[1], 1e-300), sums[1]


class _Targets(Sequence):
    """The teacher's value at a point, chunk by chunk, on the student's device and dtype and
    restricted to the student's kept channels; fetched on access (offloaded values travel to
    the device one chunk at a time)."""

    def __init__(self, runner, node, device, dtype, channel_map, channel_dim) -> None:
        self.runner, self.node = runner, node
        self.device, self.dtype = device, dtype
        self.channel_map, self.channel_dim = channel_map, channel_dim

    def __len__(self) -> int:
        return len(self.runner.value(self.node))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        t = self.runner.chunk(self.node, i).to(self.device, self.dtype)
        if self.channel_map is None:
            return t
        return t.index_select(self.channel_dim, self.channel_map)


def _positions(length: int, share: float, key: tuple[int, int]) -> torch.Tensor:
    """``ceil(share·length)`` of ``length`` spatial positions, sorted, drawn without replacement
    by a generator seeded from ``key`` (config seed, chunk): the same draw for a site's features
    and its target, reproducible run to run."""
    count = max(1, math.ceil(share * length))
    g = torch.Generator().manual_seed(key[0] * 1_000_003 + key[1])
    return torch.randperm(length, generator=g)[:count].sort().values


def _global_rows(targets: list[torch.Tensor], channel_dim: int, share: float = 1.0) -> int:
    """Sample rows (samples x positions, ``share`` of the positions kept) at a point, summed
    over ranks."""
    count = 0
    for t in targets:
        rows = t.numel() // t.shape[channel_dim]
        if share < 1.0:  # positions kept per sample
            rows = t.shape[0] * max(1, math.ceil(share * (rows // t.shape[0])))
        count += rows
    return int(all_reduce_sum(torch.tensor([count], dtype=torch.float64)).item())


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: NaN and Inf propagate through a sum (Inf − Inf is NaN), and an
    fp64 sum of finite normal-equation entries does not overflow, so one reduction tells
    (``isfinite(t).all()`` built a D×D mask: 6% of a small kernel-mode calibration)."""
    return bool(torch.isfinite(t.sum()))


def _non_finite(where: str) -> str:
    return (
        f"NaN or Inf in {where}. Hint: check the samples' scale and the model's weights; "
        "fxkd solves on finite features only."
    )


def _shard(samples: Inputs) -> Inputs:
    """This rank's share of the samples (every world_size-th one) under torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return samples[dist.get_rank() :: dist.get_world_size()]
    return samples
