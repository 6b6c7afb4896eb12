"""Helpers shared by the student builders: choosing the kept channels and slicing layers."""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from fxkd.capture import capture
from fxkd.errors import ConfigError, TraceError
from fxkd.inputs import Inputs
from fxkd.nodes import AFFINE_TYPES

__all__ = [
    "check_output_shapes",
    "kept_channels",
    "output_producers",
    "slice_batchnorm",
    "slice_inputs",
    "slice_outputs",
]


def kept_channels(scores: torch.Tensor, ratio: float, segments: int) -> list[int] | None:
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


def slice_outputs(conv: nn.Module, kept: torch.Tensor, depthwise: bool = False) -> None:
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[kept].clone())
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias[kept].clone())
    if isinstance(conv, nn.Linear):
        conv.out_features = len(kept)
        return
    conv.out_channels = len(kept)
    if depthwise:
        conv.in_channels = conv.groups = len(kept)


def slice_inputs(conv: nn.Module, kept: list[int], channels: int) -> None:
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


def slice_batchnorm(bn: nn.Module, kept: torch.Tensor) -> None:
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight = nn.Parameter(bn.weight[kept].clone())
            bn.bias = nn.Parameter(bn.bias[kept].clone())
        if bn.running_mean is not None:
            bn.running_mean = bn.running_mean[kept].clone()
            bn.running_var = bn.running_var[kept].clone()
    bn.num_features = len(kept)


def output_producers(model: nn.Module, example_inputs: torch.Tensor) -> list[str] | None:
    """Names of the conv/linear modules whose output channels reach a graph output without
    passing through another conv/linear: through per-channel ops, pooling, flatten, reshapes,
    concatenations, adds, upsampling — a classifier Linear, a conv classifier (SqueezeNet), a
    segmentation or detection head. Their width is what the model outputs, so a student keeps
    it. Walks the traced graph back from the output, stopping at the first producer on every
    path (conservative: any other op is passed through). None when torch.fx cannot trace the
    model (``check_output_shapes`` still guards the student)."""
    try:
        gm = capture(model, Inputs.example(example_inputs))
    except TraceError:
        return None
    output = next(n for n in gm.graph.nodes if n.op == "output")
    found: list[str] = []
    seen: set[fx.Node] = set()
    stack = list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, AFFINE_TYPES):
                found.append(str(node.target))
                continue
        stack.extend(node.all_input_nodes)
    return sorted(set(found))


def _shapes(out) -> list[tuple[int, ...] | None]:
    leaves, _ = tree_flatten(out)
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in leaves]


def check_output_shapes(teacher: nn.Module, student: nn.Module, example_inputs) -> None:
    """Raise ConfigError naming the outputs whose shapes differ between ``student`` and
    ``teacher`` on ``example_inputs`` (a builder must keep what the model outputs)."""
    example = Inputs.example(example_inputs)
    with torch.no_grad():
        want = _shapes(example.call(teacher))
        try:
            got = _shapes(example.call(student))
        except Exception as exc:  # a builder left an inconsistent layer
            raise ConfigError(
                f"the pruned {type(teacher).__name__} fails on example_inputs "
                f"({type(exc).__name__}: {exc}). Hint: pass the layer named there as "
                "ignored_layers=[...]"
            ) from exc
    if want != got:
        diffs = [f"output {i}: teacher {w}, student {g}"
                 for i, (w, g) in enumerate(zip(want, got, strict=False)) if w != g]  # fmt: skip
        if len(want) != len(got):
            diffs.append(f"{len(want)} outputs in the teacher, {len(got)} in the student")
        raise ConfigError(
            f"the pruned {type(teacher).__name__} no longer computes the teacher's outputs "
            f"({'; '.join(diffs)}). Hint: pass the layers that produce the outputs as "
            "ignored_layers=[...]"
        )
