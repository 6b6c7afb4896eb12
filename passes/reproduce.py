"""What a pruned student can reproduce of a teacher layer's channels, for channel selection.

Channel selection (``fxkd.passes.select``) scores a producer A's teacher channels by how well
its consumer's teacher output is rebuilt from them. But the student's A computes its channels
from its own, pruned input: from the teacher channels ``in_map`` that input carries, not from
all of them. A channel the kept inputs cannot explain is a poor one to imitate, however useful
it would be. So where ``in_map`` is known and final (A reads a network input, or a site whose
map selection does not move, such as a residual stream), selection scores what A could produce:
the teacher's A refitted on its input restricted to ``in_map`` — the least squares kernel-mode
calibration solves, with the same relative ridge towards the teacher's own weights,

    Â = argmin_W ‖A x − W x[in_map]‖² + λ‖W − A[:, in_map]‖²,

passed through the per-channel steps (BatchNorm, activation, pooling) to the consumer. Where
A's input is itself re-targeted (a chain of internal links, as in VGG), its final map is not
known when A is scored, and the teacher's own values are used.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch import nn

from fxkd.nodes import CONV_TYPES, add_operands, affine_module, is_per_channel
from fxkd.solve.normal import layer_equations

from .runner import GraphRunner

__all__ = ["input_channels", "replayable", "reproducible_values"]


def input_channels(
    teacher: fx.GraphModule,
    node: fx.Node,
    maps: dict[str, tuple[int, ...] | None],
    moving: set[str],
) -> tuple[int, ...] | None:
    """The teacher channels the student's copy of ``node``'s input carries, found by walking
    back through per-channel steps and residual adds: all of a network input's, or the map of
    the site that computes them (``maps`` by module; None there means unpruned). None when
    unknown: another kind of node, a module not in ``maps``, or one in ``moving`` (a site
    whose map may still change)."""
    channels = affine_module(teacher, node).weight.shape[1]
    return _carried(teacher, node.args[0], maps, moving, channels)


def _carried(teacher, x, maps, moving, channels) -> tuple[int, ...] | None:
    while isinstance(x, fx.Node):
        if x.op == "placeholder":
            return tuple(range(channels))
        if affine_module(teacher, x) is not None:
            name = str(x.target)
            if name in moving or name not in maps:
                return None
            return tuple(range(channels)) if maps[name] is None else tuple(maps[name])
        operands = add_operands(x)
        if operands is not None:  # a residual add: both operands carry the stream's channels
            found = {_carried(teacher, a, maps, moving, channels) for a in operands}
            return found.pop() if len(found) == 1 else None
        if not (is_per_channel(teacher, x) and x.args and _single_input(x)):
            return None
        x = x.args[0]
    return None


def _single_input(node: fx.Node) -> bool:
    """No tensor operand but the first: the step can be replayed on another value."""
    rest = [*node.args[1:], *node.kwargs.values()]
    return not any(isinstance(a, fx.Node) for a in rest)


def replayable(steps: list[fx.Node]) -> bool:
    """Whether ``reproducible_values`` can replay ``steps`` on a refitted producer's output."""
    return all(_single_input(s) for s in steps)


def reproducible_values(
    teacher: fx.GraphModule,
    node: fx.Node,
    steps: list[fx.Node],
    runner: GraphRunner,
    count: int,
    in_map: tuple[int, ...],
    ridge: float,
) -> Iterator[torch.Tensor]:
    """The teacher's values at the end of ``steps`` (the consumer's input), chunk by chunk, as
    the producer called by ``node`` reproduces them from its input's ``in_map`` channels (see
    the module docstring). ``runner`` holds the producer's input and output for its ``count``
    chunks; ``steps`` must be ``replayable``."""
    restricted = _refit(teacher, node, runner, count, in_map, ridge)

    def values() -> Iterator[torch.Tensor]:
        for i in range(count):
            yield _replay(
                teacher, steps, restricted(_kept(runner.chunk(node.args[0], i), restricted, in_map))
            )

    return values()


def _kept(x: torch.Tensor, module: nn.Module, in_map: tuple[int, ...]) -> torch.Tensor:
    index = torch.tensor(in_map, device=x.device)
    return x.index_select(1 if isinstance(module, CONV_TYPES) else -1, index)


@torch.no_grad()
def _refit(teacher, node, runner, count, in_map, ridge) -> nn.Module:
    """A copy of the producer that reads ``in_map`` only, refitted by ridge least squares on
    the samples (towards its own weights there)."""
    module = copy.deepcopy(affine_module(teacher, node))
    conv = isinstance(module, CONV_TYPES)
    index = torch.tensor(in_map, device=module.weight.device)
    module.weight = nn.Parameter(module.weight.index_select(1, index))
    if module.bias is None:
        module.bias = nn.Parameter(module.weight.new_zeros(module.weight.shape[0]))
    if conv:
        module.in_channels = len(in_map)
    else:
        module.in_features = len(in_map)
    k, d = module.weight.shape[0], module.weight[0].numel()
    eqs = layer_equations(
        module,
        (_kept(runner.chunk(node.args[0], i), module, in_map) for i in range(count)),
        (runner.chunk(node, i) for i in range(count)),
    )
    w0 = module.weight.detach().double().reshape(k, d)
    prior = torch.cat([w0.T, module.bias.detach().double()[None]])[None].to(eqs.device)
    w = eqs.solve(ridge, prior)[0]
    module.weight.copy_(w[:d].T.reshape(module.weight.shape))
    module.bias.copy_(w[d])
    return module


def _replay(gm: fx.GraphModule, steps: list[fx.Node], value: torch.Tensor) -> torch.Tensor:
    for step in steps:
        rest, kwargs = step.args[1:], step.kwargs
        if step.op == "call_module":
            value = gm.get_submodule(str(step.target))(value, *rest, **kwargs)
        elif step.op == "call_function":
            value = step.target(value, *rest, **kwargs)
        else:
            value = getattr(value, str(step.target))(*rest, **kwargs)
    return value
