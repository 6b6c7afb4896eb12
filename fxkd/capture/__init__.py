"""Capture: a model becomes the torch.fx GraphModule the passes work on, nodes carrying shapes.

Two front-ends, one graph form:

- ``"fx"``: symbolic tracing (``torch.fx``), module-level graphs (:func:`trace`);
- ``"export"``: ``torch.export`` (non-strict), aten-level graphs normalised back to modules and
  torch-level calls (:mod:`fxkd.capture.export`, :mod:`fxkd.capture.aten`);
- ``"auto"`` (the default): symbolic tracing, then ``torch.export`` where it fails or where
  the traced graph hides layers (:func:`hides_layers`: a conv, linear or BatchNorm that
  symbolic tracing followed into its functional call, e.g. timm's ``BatchNormAct2d``), which
  the export front-end lifts back to modules.

:func:`captured_with` tells which front-end made a graph. Capture never copies or mutates the
model: the graph shares its Parameters and buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxkd.capture.tracing import FxkdTracer, annotate_shapes, eval_mode, node_shape, trace
from fxkd.errors import ConfigError, TraceError
from fxkd.inputs import Inputs

__all__ = [
    "CAPTURE_METHODS",
    "FxkdTracer",
    "annotate_shapes",
    "capture",
    "capture_all",
    "capture_error",
    "captured_with",
    "eval_mode",
    "hides_layers",
    "node_shape",
    "trace",
]

CAPTURE_METHODS = ("auto", "fx", "export")
_KEY = "fxkd_capture"


def captured_with(gm: fx.GraphModule) -> str:
    """``"fx"`` or ``"export"``: the front-end that made ``gm`` (``"fx"`` for a graph fxkd did
    not capture, e.g. one the user traced)."""
    return gm.meta.get(_KEY, "fx")


def capture(
    model: nn.Module,
    example: torch.Tensor | Inputs,
    *,
    method: str = "auto",
    leaf_modules: Sequence[type] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """``model`` as a GraphModule annotated with shapes on ``example`` (one batch): the one
    model of :func:`capture_all`."""
    graphs, _ = capture_all(
        [model], [example], method=method, leaf_modules=leaf_modules, concrete_args=concrete_args
    )
    return graphs[0]


def capture_all(
    models: Sequence[nn.Module],
    examples: Sequence[torch.Tensor | Inputs],
    *,
    method: str = "auto",
    leaf_modules: Sequence[type] = (),
    concrete_args: dict[str, Any] | None = None,
) -> tuple[list[fx.GraphModule], str]:
    """Every model captured by one front-end (graphs of one flavour align node for node), each
    annotated with shapes on its example batch, and the front-end's name.

    ``method``: ``"fx"``, ``"export"`` or ``"auto"``: symbolic tracing when it captures every
    model and no traced graph hides layers (:func:`hides_layers`), else ``torch.export`` for
    all (the traced graphs when export fails where tracing only hid layers). A GraphModule
    passes through as it is. Raises TraceError naming every front-end tried and why it failed;
    a batch the model itself cannot run on is reported as that, not as a capture failure."""
    if method not in CAPTURE_METHODS:
        raise ConfigError(f"capture={method!r}; expected one of {CAPTURE_METHODS}")
    pairs = list(zip(models, [Inputs.of(e) for e in examples], strict=True))
    failures: dict[str, str] = {}
    traced = None
    if method in ("auto", "fx"):
        try:
            traced = [_traced(m, x, leaf_modules, concrete_args) for m, x in pairs]
        except _NotTraced as exc:
            failures["symbolic tracing"] = str(exc)
        else:
            if method == "fx" or not any(hides_layers(gm) for gm in traced):
                return traced, "fx"
    if method in ("auto", "export"):
        from fxkd.capture.export import export_graph

        try:
            graphs = [m if isinstance(m, fx.GraphModule) else export_graph(m, x) for m, x in pairs]
        except Exception as exc:
            if traced is not None:
                return traced, "fx"
            failures["torch.export"] = _first_line(exc)
        else:
            for gm, (_, x) in zip(graphs, pairs, strict=True):
                annotate_shapes(gm, x)
                gm.meta.setdefault(_KEY, "export")
            return graphs, "export"
    raise capture_error(" and ".join(sorted({type(m).__name__ for m in models})), failures)


class _NotTraced(Exception):
    """Symbolic tracing could not capture a model (the message says why)."""


def _traced(model, example: Inputs, leaf_modules, concrete_args) -> fx.GraphModule:
    """``model`` symbolically traced and annotated; _NotTraced when tracing fails or its graph
    does not run where the model does (a GraphModule passes through)."""
    try:
        gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    except TraceError as exc:
        raise _NotTraced(_first_line(exc.__cause__ or exc)) from exc
    try:
        annotate_shapes(gm, example)
    except TraceError as exc:
        if not _runs(model, example):
            raise  # the samples do not fit the model: no front-end would help
        raise _NotTraced(_first_line(exc.__cause__ or exc)) from exc
    gm.meta.setdefault(_KEY, "fx")
    return gm


_FUNCTIONAL_LAYERS = {F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm}


def hides_layers(gm: fx.GraphModule) -> bool:
    """Whether a traced graph calls a conv, linear or BatchNorm functionally on the model's own
    tensors (``get_attr``): a module symbolic tracing followed into (timm's
    ``BatchNormAct2d``), so no site or BatchNorm is seen there. ``torch.export``'s graph,
    normalised, has them as modules."""
    return any(
        n.op == "call_function"
        and n.target in _FUNCTIONAL_LAYERS
        and any(isinstance(a, fx.Node) and a.op == "get_attr" for a in n.args[1:])
        for n in gm.graph.nodes
    )


def capture_error(name: str, failures: dict[str, str]) -> TraceError:
    """The TraceError for a model no front-end captured: each attempt and its reason."""
    tried = "; ".join(f"{k}: {v}" for k, v in failures.items())
    return TraceError(
        f"could not capture {name} ({tried}). Hint: Python control flow on tensor values "
        "cannot be captured by either front-end: rewrite it with torch.where / torch.cond, or "
        "mark the module holding it a leaf (leaf_modules=..., symbolic tracing only).",
        failures,
    )


def _runs(model: nn.Module, example: Inputs) -> bool:
    """Whether the model itself runs on the example batch (in eval mode)."""
    with eval_mode(model):
        return example.failure(model) is None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
