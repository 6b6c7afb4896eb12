"""Symbolic tracing: a model becomes a module-level torch.fx GraphModule whose nodes carry shapes.

Tracing never copies or mutates the model: the GraphModule shares its submodules. Shapes come
from ``ShapeProp`` on one real batch (``node.meta["tensor_meta"]``), run under ``no_grad`` with
the model in eval mode, training flags restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxkd.errors import TraceError
from fxkd.inputs import Inputs

__all__ = ["FxkdTracer", "annotate_shapes", "eval_mode", "node_shape", "trace"]


class FxkdTracer(fx.Tracer):
    """torch.fx's tracer with a leaf-module policy the user can extend.

    A module is a leaf (called as a whole, not traced into) when torch.fx says so (torch.nn
    modules) or when it is an instance of one of ``leaf_modules``.
    """

    def __init__(self, leaf_modules: Sequence[type] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode for the block; restore every submodule's own flag afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def trace(
    model: nn.Module,
    example: torch.Tensor | Inputs | None = None,
    *,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model``; with ``example``, annotate every node with its shape.

    A GraphModule passes through (re-traced only to add shapes). Raises TraceError naming the
    cause, with the usual remedies: mark the offending module a leaf (``leaf_modules=``) or fix
    data-dependent arguments (``concrete_args=``).
    """
    if isinstance(model, fx.GraphModule) and not leaf_modules and concrete_args is None:
        gm = model
    else:
        name = type(model).__name__
        try:
            tracer = FxkdTracer(leaf_modules)
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:  # fx raises many types; all mean "cannot trace"
            raise TraceError(
                f"torch.fx could not trace {name}: {type(exc).__name__}: {exc}. Hint: "
                "data-dependent control flow or untraceable calls cannot be traced; pass the "
                "module types that contain them as leaf_modules=(...), or fix arguments with "
                "concrete_args."
            ) from exc
        gm = fx.GraphModule(tracer.root, graph, name)
    if example is not None:
        annotate_shapes(gm, example)
    return gm


def annotate_shapes(gm: fx.GraphModule, example: torch.Tensor | Inputs) -> None:
    """Run ``ShapeProp`` on one batch (no grad, eval mode) so nodes carry ``tensor_meta``."""
    example = Inputs.of(example)
    try:
        values = example.placeholder_values(gm)
        with torch.no_grad(), eval_mode(gm):
            ShapeProp(gm).propagate(*values)
    except Exception as exc:
        raise TraceError(
            f"running the captured {gm.__class__.__name__} on an example batch "
            f"({example.describe()}) failed: {type(exc).__name__}: {exc}. Hint: check that the "
            "samples have the input shape the model expects."
        ) from exc


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for a node whose value is a tensor, else None."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None
