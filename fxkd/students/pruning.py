"""Student builders that record how the student's channels map to the teacher's.

``prune`` removes whole filters (and everything coupled to them: BatchNorms, the next layers'
input channels, residual partners, concatenations, grouped/depthwise convs) with torch-pruning's
dependency graph, choosing the filters itself so the kept indices are known exactly. ``decouple``
replaces each regular k×k conv by a depthwise k×k conv and a pointwise 1×1 conv (network
decoupling), initialised from a per-input-channel SVD of the kernel.

The builders store the channel maps on the returned student (attribute ``fxkd_channel_maps``,
``{module name: kept teacher output channels}``), where ``fxkd.compress`` finds them.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from fxkd.errors import ConfigError
from fxkd.inputs import Inputs
from fxkd.nodes import CONV_TYPES
from fxkd.students.budget import BudgetExceeded, analysis_budget, default_memory_budget
from fxkd.students.chains import prune_chains
from fxkd.students.common import check_output_shapes, output_producers
from fxkd.students.lanes import prune_lanes
from fxkd.students.streams import prune_streams

__all__ = ["CHANNEL_MAPS_ATTR", "SCOPES", "TorchPruningError", "channel_maps_of", "prune"]

log = logging.getLogger(__name__)
CHANNEL_MAPS_ATTR = "fxkd_channel_maps"


def channel_maps_of(student: nn.Module) -> dict[str, list[int]]:
    """The channel maps a builder recorded on ``student`` (empty when none)."""
    return dict(getattr(student, CHANNEL_MAPS_ATTR, None) or {})


def _importance(group, kind: str) -> torch.Tensor:
    """Per-channel importance of a coupled group: summed L1 norms of its filters ("l1") or
    summed |γ| of its BatchNorms ("bn", network slimming; L1 when the group has none)."""
    import torch_pruning as tp

    l1, gamma = None, None
    for dep, idxs in group:
        layer = dep.target.module
        if dep.handler not in (
            tp.prune_conv_out_channels,
            tp.prune_depthwise_conv_out_channels,
            tp.prune_linear_out_channels,
            tp.prune_batchnorm_out_channels,
        ):
            continue
        idx = torch.as_tensor([int(i) for i in idxs])
        width = layer.weight.shape[0] if getattr(layer, "weight", None) is not None else 0
        if len(idx) and int(idx.max()) >= width:
            # torch-pruning's concat index bookkeeping (DenseNet) can point past a layer
            # that sees only part of the concatenation: score with the other members
            log.debug("skipping %s in importance: index %d >= %d", dep, int(idx.max()), width)
            continue
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.weight is not None:
            g = layer.weight.detach().abs()[idx]
            gamma = g if gamma is None else gamma + g
        elif isinstance(layer, (*CONV_TYPES, nn.Linear)):
            n = layer.weight.detach().flatten(1).abs().sum(1)[idx]
            l1 = n if l1 is None else l1 + n
    if kind == "bn" and gamma is not None:
        return gamma
    if l1 is None:
        raise ConfigError("a pruning group holds no conv/linear filters")
    return l1


SCOPES = ("auto", "all", "internal")


class TorchPruningError(ConfigError):
    """torch-pruning could not analyse or prune the model (``scope="auto"`` falls back)."""


def prune(
    teacher: nn.Module,
    ratio: float,
    *,
    importance: str = "l1",
    example_inputs: torch.Tensor | tuple | dict | Inputs,
    ignored_layers: list[nn.Module] | None = None,
    scope: str = "auto",
    time_budget_s: float | None = 120.0,
    memory_budget_bytes: int | str | None = "auto",
    progress: bool = True,
) -> nn.Module:
    """A filter-pruned copy of ``teacher`` with ``ratio`` of each coupled channel group removed.

    example_inputs: one batch: a tensor, a tuple of positional inputs or a dict of keyword
    inputs (``input_ids`` + ``attention_mask``), or :class:`fxkd.inputs.Inputs`.

    importance: ``"l1"`` (Li et al., L1-norm filter pruning) or ``"bn"`` (Liu et al., network
    slimming: BatchNorm |γ|). ``ignored_layers`` keep their output width (default: the last
    Linear), and so does every layer whose channels reach a model output (a conv classifier,
    a segmentation head: ``fxkd.students.common.output_producers``): the student computes
    outputs of exactly the teacher's shapes, or ConfigError names the outputs that differ. The
    teacher is untouched.

    scope: ``"all"`` prunes every coupled channel group, block outputs too, with
    torch-pruning's dependency graph (ConfigError when it cannot analyse the model);
    ``"internal"`` prunes only the channels internal to conv chains (``fxkd.students.chains``:
    block outputs keep their width; works where torch-pruning does not, e.g. ShuffleNet's
    channel shuffle, RegNet's grouped bottlenecks); ``"auto"`` (default) is ``"all"``, falling
    back with a warning, when torch-pruning fails or its analysis runs past
    ``time_budget_s`` seconds or grows the process's memory by more than
    ``memory_budget_bytes`` (``"auto"``: half the memory available when it starts; None: no
    budget), to fxkd's own analysis (``progress``: tqdm bars over torch-pruning's channel
    groups as they are found and pruned): the internal chains
    and the block outputs: residual streams (``fxkd.students.streams``: joined only by adds and
    per-channel ops, e.g. RegNet's stages) and routing regions (``fxkd.students.lanes``:
    concatenations, chunks and channel shuffles, e.g. ShuffleNet's stages); block outputs that
    meet both an add and a routing op, or anything else, keep their width."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio={ratio!r} must be in [0, 1)")
    if importance not in ("l1", "bn"):
        raise ConfigError(f"importance={importance!r} is not 'l1' or 'bn'")
    if scope not in SCOPES:
        raise ConfigError(f"scope={scope!r} is not one of {SCOPES}")
    ignored_layers = _with_output_producers(teacher, example_inputs, ignored_layers)
    if scope == "internal":
        student = _prune_with_fxkd(teacher, ratio, importance, example_inputs, ignored_layers)[0]
        check_output_shapes(teacher, student, example_inputs)
        return student
    try:
        student = _prune_all(
            teacher,
            ratio,
            importance,
            example_inputs,
            ignored_layers,
            time_budget_s,
            default_memory_budget() if memory_budget_bytes == "auto" else memory_budget_bytes,
            progress,
        )
        check_output_shapes(teacher, student, example_inputs)
        return student
    except TorchPruningError as exc:
        if scope == "all":
            raise
        try:
            student, streams = _prune_with_fxkd(
                teacher, ratio, importance, example_inputs, ignored_layers, streams=True
            )
        except ConfigError as fallback:  # both analyses gave up: say why each did
            raise ConfigError(
                f"{str(exc).split('. Hint')[0]}; then fxkd's own analysis: {fallback}"
            ) from exc
        check_output_shapes(teacher, student, example_inputs)
        log.warning(
            "%s; pruned it with fxkd's own coupling analysis instead: the internal channels of "
            "its conv chains and %d residual stream(s) or routing region(s) of block outputs "
            "(fxkd.students.streams, fxkd.students.lanes; other block outputs keep their width)",
            str(exc).split(". Hint")[0],
            streams,
        )
        return student


def _for_torch_pruning(example_inputs):
    """The example as torch-pruning calls a model with it: a tensor, a tuple (positional
    inputs) or a dict (keyword inputs)."""
    if not isinstance(example_inputs, Inputs):
        return example_inputs
    if example_inputs.kwargs and example_inputs.args:
        raise ConfigError(
            "torch-pruning takes positional or keyword example inputs, not both. Hint: give "
            "example_inputs as a dict of keyword inputs."
        )
    if example_inputs.kwargs:
        return dict(example_inputs.kwargs)
    return example_inputs.single if example_inputs.single is not None else example_inputs.args


def _with_output_producers(teacher, example_inputs, ignored_layers) -> list[nn.Module]:
    """``ignored_layers`` (default: the last Linear) plus every layer whose output channels
    reach a model output (``output_producers``): a student computes the teacher's outputs."""
    modules = dict(teacher.named_modules())
    if ignored_layers is None:
        ignored = [m for m in teacher.modules() if isinstance(m, nn.Linear)][-1:]
    else:
        ignored = list(ignored_layers)
    for name in output_producers(teacher, example_inputs) or []:
        if not any(modules[name] is m for m in ignored):
            ignored.append(modules[name])
    return ignored


def _prune_with_fxkd(
    teacher, ratio, importance, example_inputs, ignored_layers, streams: bool = False
) -> tuple[nn.Module, int]:
    """``scope="internal"``: ``chains`` on a copy (and, with ``streams``, then the block
    outputs: the residual streams of ``streams`` and the routing regions of ``lanes``);
    maps recorded like ``_prune_all``. Returns the student and the number of streams and
    regions pruned."""

    student = copy.deepcopy(teacher).eval()
    copies = dict(student.named_modules())
    names = {m: n for n, m in teacher.named_modules()}
    ignored = tuple(copies[names[m]] for m in (ignored_layers or []))
    maps = prune_chains(student, ratio, importance, ignored, example_inputs)
    pruned = []
    if streams:
        stream_maps, pruned = prune_streams(student, ratio, example_inputs, importance, ignored)
        maps.update(stream_maps)
        skip = set(maps) | {n for n, m in student.named_modules() if m in ignored}
        student, lane_maps, regions = _with_lanes(student, ratio, example_inputs, importance, skip)
        maps.update(lane_maps)
        pruned += regions
    if not maps:
        raise ConfigError(
            f"{type(teacher).__name__} has no internal conv chain to prune (conv -> [BN, "
            "activation, depthwise conv] -> conv with one user at every step). Hint: prune it "
            "with another tool; compress infers the kept channels or takes channel_maps="
        )
    failure = Inputs.example(example_inputs).failure(student)
    if failure is not None:  # a chain rule met a layer it does not model
        raise ConfigError(
            f"the internally pruned {type(teacher).__name__} fails on example_inputs "
            f"({type(failure).__name__}: {failure}). Hint: pass the chain's layers as "
            "ignored_layers"
        ) from failure
    setattr(student, CHANNEL_MAPS_ATTR, maps)
    return student, len(pruned)


def _with_lanes(student, ratio, example_inputs, importance, skip):
    """fxkd.students.lanes on a copy of ``student``; the copy only when the analysis succeeds and
    the result runs on ``example_inputs``, else ``student`` as it was (a warning says why)."""

    candidate = copy.deepcopy(student)
    try:
        maps, regions = prune_lanes(candidate, ratio, example_inputs, importance, skip)
        with torch.no_grad():
            Inputs.example(example_inputs).call(candidate)
    except Exception as exc:  # an op the tag run does not model: block outputs keep width
        log.warning(
            "fxkd.students.lanes could not prune the routed block outputs (%s: %s); they keep "
            "their width",
            type(exc).__name__,
            exc,
        )
        return student, {}, []
    return candidate, maps, regions


def _prune_all(
    teacher, ratio, importance, example_inputs, ignored_layers, budget_s=None, memory_bytes=None,
    progress=True,
) -> nn.Module:  # fmt: skip
    """``scope="all"``: torch-pruning's coupled groups, fxkd's scores and kept indices, its
    analysis and pruning within ``budget_s`` seconds and ``memory_bytes`` of memory growth
    (TorchPruningError past either)."""
    try:
        with analysis_budget(budget_s, memory_bytes):
            return _prune_with_torch_pruning(
                teacher, ratio, importance, example_inputs, ignored_layers, progress
            )
    except BudgetExceeded as exc:
        raise TorchPruningError(
            f"torch-pruning's analysis of {type(teacher).__name__} {exc}. Hint: raise "
            "time_budget_s= or memory_budget_bytes=, or prune with scope='internal'"
        ) from exc


def _prune_with_torch_pruning(
    teacher, ratio, importance, example_inputs, ignored_layers, progress=True
) -> nn.Module:
    """torch-pruning's coupled groups, fxkd's scores and kept indices; progress bars over the
    groups as torch-pruning finds them (its enumeration is what can run long) and as they are
    pruned."""
    import torch_pruning as tp

    student = copy.deepcopy(teacher).eval()
    names = {m: n for n, m in student.named_modules()}
    if ignored_layers is None:
        ignored = [m for m in student.modules() if isinstance(m, nn.Linear)][-1:]
    else:  # the user names teacher modules: ignore their copies in the student
        teacher_names = {m: n for n, m in teacher.named_modules()}
        copies = dict(student.named_modules())
        ignored = [copies[teacher_names[m]] for m in ignored_layers]
    try:
        graph = tp.DependencyGraph().build_dependency(
            student, example_inputs=_for_torch_pruning(example_inputs)
        )
    except Exception as exc:  # torch-pruning's tracer meets an op it cannot map
        raise TorchPruningError(
            f"torch-pruning could not analyse {type(teacher).__name__}'s channel dependencies "
            f"({type(exc).__name__}: {exc}). Hint: prune it with another tool; compress infers "
            "the kept channels from the BatchNorms or takes channel_maps="
        ) from exc
    maps: dict[str, list[int]] = {}
    bar = {"unit": "group", "disable": not progress, "leave": False}
    name = type(teacher).__name__
    groups = graph.get_all_groups(
        ignored_layers=ignored, root_module_types=[*CONV_TYPES, nn.Linear]
    )
    groups = list(tqdm(groups, desc=f"fxkd prune: {name}'s channel groups", **bar))
    for group in tqdm(groups, desc=f"fxkd prune: pruning {name}", **bar):
        root = group[0].dep
        try:  # a group whose members disagree in width (GhostNet's concatenations) fails here
            scores = _importance(group, importance)
            n_prune = min(math.floor(len(scores) * ratio), len(scores) - 1)
            if n_prune <= 0:
                continue
            order = scores.argsort()[:n_prune]
            root_idxs = [group[0].idxs[int(i)] for i in order]
            pruning = graph.get_pruning_group(root.target.module, root.handler, root_idxs)
            valid = graph.check_pruning_group(pruning)
        except (BudgetExceeded, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise TorchPruningError(
                f"torch-pruning's channel group of {names.get(root.target.module, '?')} in "
                f"{type(teacher).__name__} could not be scored ({type(exc).__name__}: {exc}). "
                "Hint: prune with scope='internal', or pass that layer as ignored_layers=[...]"
            ) from exc
        if not valid:
            log.info("group of %s cannot be pruned; kept", names.get(root.target.module))
            continue
        for dep, idxs in pruning:
            layer = dep.target.module
            if isinstance(layer, (*CONV_TYPES, nn.Linear)) and dep.handler in (
                tp.prune_conv_out_channels,
                tp.prune_depthwise_conv_out_channels,
                tp.prune_linear_out_channels,
            ):
                width = layer.weight.shape[0]
                removed = set(int(i) for i in idxs)
                maps[names[layer]] = [c for c in range(width) if c not in removed]
        try:
            pruning.prune()
        except Exception as exc:  # torch-pruning's index bookkeeping fails on this group
            raise TorchPruningError(
                f"torch-pruning could not prune the channel group of "
                f"{names.get(root.target.module, '?')} in {type(teacher).__name__} "
                f"({type(exc).__name__}: {exc}). Hint: prune it with another tool; compress "
                "infers the kept channels from the BatchNorms or weights, or takes channel_maps="
            ) from exc
    failure = Inputs.example(example_inputs).failure(student)
    if failure is not None:  # groups pruned one by one can leave an inconsistent layer
        raise TorchPruningError(
            f"the {type(teacher).__name__} pruned by torch-pruning fails on example_inputs "
            f"({type(failure).__name__}: {failure}). Hint: pass the layer named there as "
            "ignored_layers=[...], or prune with scope='internal'"
        ) from failure
    setattr(student, CHANNEL_MAPS_ATTR, maps)
    return student
