"""The ``torch.export`` front-end: non-strict export, then ``normalise_aten``.

What symbolic tracing cannot follow (iterating over a tensor's shape, ``if`` on a config value
read through a proxy, Hugging Face models) ``torch.export`` runs with fake tensors and records
as aten calls. The batch dimension of every input is exported as dynamic (``Dim.AUTO``), so
the graph runs on calibration chunks of any size; other shapes are fixed by the example.
The exported module shares the model's Parameters and buffers (nothing is copied).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxkd.capture.aten import normalise_aten
from fxkd.capture.tracing import eval_mode
from fxkd.inputs import Inputs

__all__ = ["dynamic_batch", "export_graph"]


def export_graph(model: nn.Module, example: Inputs) -> fx.GraphModule:
    """``torch.export.export(model, ...)`` (non-strict, eval mode) as a normalised GraphModule.

    Raises whatever torch.export raises; :func:`fxkd.capture.capture` words it."""
    if len(example) < 2:  # torch.export specialises a dimension of size 0 or 1
        example = Inputs.cat([example, example])
    with torch.no_grad(), eval_mode(model):
        program = torch.export.export(
            model,
            example.args,
            example.kwargs,
            dynamic_shapes=dynamic_batch(model, example),
            strict=False,
        )
    # a plain GraphModule: the exported one refuses train()/eval(), which the passes call
    exported = program.module()
    gm = fx.GraphModule(exported, exported.graph, type(model).__name__)
    gm.eval()
    return normalise_aten(gm)


def dynamic_batch(
    model: nn.Module, example: Inputs, batch: Any = torch.export.Dim.AUTO
) -> dict[str, Any] | tuple | None:
    """``dynamic_shapes`` making dim 0 of every input dynamic (``batch``: a Dim, or a name
    for the ONNX exporter), keyed the way torch.export matches them: by ``forward``'s
    parameter names (``*args``/``**kwargs`` as a tuple/dict)."""
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*example.args, **example.kwargs)
    except (TypeError, ValueError):
        return tuple({0: batch} for _ in example.args) if not example.kwargs else None
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple({0: batch} for _ in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: {0: batch} for k in value}
        else:
            out[name] = {0: batch}
    return out
