"""A short label-free gradient polish after the closed form (optional).

The closed form fits each point separately and linearly; a few steps of gradient descent on
the same unlabelled samples can trade errors across layers and through the nonlinearities.
The loss is the teacher-normalised squared error summed over the chosen points::

    L = Σ_points ||y_s − y_t||² / ||y_t||²        (y_t restricted to the student's channels)

with Adam, the student's BatchNorm statistics frozen (eval mode) and nothing else changed: the
polished student keeps every parameter shape, so it stays folded and exports the same way. No
labels are used. Where the closed form is already exact the polish cannot help, and a long or
large-step polish can overfit N samples; the README reports it as its own row, with its time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from fxkd.align import Alignment
from fxkd.capture import capture
from fxkd.errors import ConfigError
from fxkd.inputs import Inputs
from fxkd.placement import module_device, to_module

__all__ = ["polish"]


def _tapped(
    model: nn.Module, names: Sequence[str], example: Inputs
) -> Callable[[Inputs], tuple[torch.Tensor, ...]]:
    """A traced view of ``model`` (sharing its parameters) that returns its values at
    ``names`` for a batch of inputs; unknown names raise ConfigError listing the graph's
    nodes."""
    traced = capture(model, example)  # a GraphModule passes through: work on a graph copy
    graph = copy.deepcopy(traced.graph)
    graph._codegen = fx.graph.CodeGen()  # placeholders in, the tapped tuple out
    gm = fx.GraphModule(traced, graph)
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in names if n not in nodes]
    if missing:
        raise ConfigError(
            f"points {missing} are not nodes of {type(model).__name__}'s graph. Hint: use the "
            f"node names of the traced model, e.g. {list(nodes)[:8]}..."
        )
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (tuple(nodes[n] for n in names),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return lambda inputs: gm(*inputs.placeholder_values(traced))


def polish(
    teacher: nn.Module,
    student: nn.Module,
    samples: torch.Tensor | Inputs,
    points: Alignment | Sequence[tuple[str, str]],
    *,
    channel_maps: Sequence[Sequence[int] | None] | None = None,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """A polished copy of ``student`` (the argument is not modified).

    Defaults (200 Adam steps at lr 1e-3, batches of 64, every aligned point) were picked on a
    held-out slice of Fashion-MNIST's training split (VGG teacher, L1-pruned 50% and 75%
    students, N=100), never on the test set.

    points: ``compress``'s ``result.alignment`` (every aligned point, with its channel map) or
    ``[(student node, teacher node), ...]`` (e.g. the features before global pooling, as MiR
    does), with ``channel_maps`` (kept teacher channels per pair, or None) for pruned points.
    callback: called as ``callback(step, model)`` after each step (1-based; the model is the
    one being polished, in eval mode: evaluate it, do not train it), e.g. to log or to keep
    checkpoints.
    """
    if steps < 0 or lr <= 0 or batch_size < 1:
        raise ConfigError(f"steps={steps}, lr={lr}, batch_size={batch_size}: need >= 0, > 0, >= 1")
    if isinstance(points, Alignment):
        pairs = [(p.site.point, p.teacher_point) for p in points.pairs]
        maps = [p.channel_map for p in points.pairs]
        dims = [p.site.channel_dim for p in points.pairs]
    else:
        pairs = [tuple(p) for p in points]
        maps = list(channel_maps) if channel_maps is not None else [None] * len(pairs)
        dims = [1] * len(pairs)
    if not pairs or len(maps) != len(pairs):
        raise ConfigError("polish needs at least one (student, teacher) point and one map each")
    samples = Inputs.of(samples)
    model = copy.deepcopy(student).eval()
    device = module_device(model)
    example = to_module(samples[:2], model)
    s_tap = _tapped(model, [s for s, _ in pairs], example)
    t_tap = _tapped(teacher, [t for _, t in pairs], to_module(samples[:2], teacher))
    with torch.no_grad():  # the teacher's values at the points, once
        chunks = [t_tap(to_module(c, teacher)) for c in samples.split(batch_size)]
    targets = []
    for k, (cmap, dim) in enumerate(zip(maps, dims, strict=True)):
        t = torch.cat([c[k] for c in chunks]).to(device)
        if cmap is not None:
            t = t.index_select(dim, torch.tensor(list(cmap), device=device))
        targets.append(t)
    scales = [t.pow(2).mean().clamp_min(1e-12) for t in targets]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    samples = to_module(samples, model)
    batch = min(batch_size, len(samples))
    for step in tqdm(range(1, steps + 1), desc="fxkd polish", unit="step", disable=not progress):
        idx = torch.randperm(len(samples), generator=g)[:batch]
        values = s_tap(samples[idx])
        loss = sum(
            (v - t[idx.to(t.device)]).pow(2).mean() / s
            for v, t, s in zip(values, targets, scales, strict=True)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            with torch.no_grad():
                callback(step, model)
    return model.eval()
