"""FoldBatchNorm and FoldAdapters: merge BatchNorms and solved adapters into their producers.

    producer ─▶ bn ─▶ users                    ──FoldBatchNorm──▶  producer' ─▶ users
    producer ─▶ [bn] ─▶ adapter ─▶ users       ──FoldAdapters──▶   producer' ─▶ [bn'] ─▶ users

FoldAdapters keeps every parameter's shape (fxkd.solve.fold: ``W' = Q·W`` per group at every kernel
tap, ``b' = Q·b + c``, through a kept BatchNorm when there is one). A site that cannot be folded
keeps its adapter (the model stays correct) and the reason is recorded in ``self.outcome``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.nn.utils import parametrize

from fxkd.nodes import (
    affine_module,
    eval_batchnorm,
    module_call_counts,
    site_producer,
    spatial_dims,
)
from fxkd.solve.fold import (
    compose_pointwise,
    effective_affine,
    fuse_batchnorm,
    write_effective_affine,
)

from .adapter import ADAPTER_TYPES, KernelAdapter
from .base import FxkdPass

__all__ = ["FoldAdapters", "FoldBatchNorm", "batchnorm_folded_view"]

log = logging.getLogger(__name__)

FOLDED = "fxkd_bn_folded_"
"""Name prefix of the fused modules ``batchnorm_folded_view`` adds."""


def _set_module(gm: fx.GraphModule, qualname: str, module: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _batchnorm_pairs(gm: fx.GraphModule):
    """(producer node, producer, BatchNorm node, BatchNorm) for every conv/linear whose output
    feeds only an eval BatchNorm, which takes nothing else (snapshot of the graph's nodes)."""
    for node in list(gm.graph.nodes):
        producer = affine_module(gm, node)
        if producer is None or len(node.users) != 1:
            continue
        (bn_node,) = node.users
        bn = eval_batchnorm(gm, bn_node, spatial_dims(producer))
        if bn is not None and bn_node.args == (node,) and not bn_node.kwargs:
            yield node, producer, bn_node, bn


class FoldBatchNorm(FxkdPass):
    """Fuse every eval BatchNorm that directly follows a conv/linear into it
    (``torch.nn.utils.fusion``), when the producer has no other user and is called once."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        calls = module_call_counts(gm)
        self.folded: list[str] = []
        for node, producer, bn_node, bn in _batchnorm_pairs(gm):
            if calls[str(node.target)] != 1 or calls[str(bn_node.target)] != 1:
                continue
            _set_module(gm, str(node.target), fuse_batchnorm(producer, bn))
            bn_node.replace_all_uses_with(node)
            gm.graph.erase_node(bn_node)
            self.folded.append(bn_node.name)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, bool(self.folded))


def batchnorm_folded_view(gm: fx.GraphModule, keep: Iterable[str] = ()) -> fx.GraphModule:
    """A GraphModule computing ``gm`` in eval mode with every conv/linear → eval BatchNorm pair
    whose producer output feeds only that BatchNorm (and is not named in ``keep``) run as one
    fused module (``fuse_batchnorm``: ``torch.nn.utils.fusion``, a new module per pair). The
    fused call takes the BatchNorm node's name, so every node that remains keeps its name and
    its value (up to rounding). ``gm`` is not modified; the modules not fused are shared with
    it, not copied.

    What calibration runs the teacher (and the student as given) with: it needs their values
    at named points only, and BatchNorm is 10–15% of a ResNet's forward on a CPU."""
    keep = set(keep)
    view = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    fused = 0
    for node, producer, bn_node, bn in _batchnorm_pairs(view):
        if node.name in keep or parametrize.is_parametrized(producer):  # a parametrized
            continue  # weight is computed: left as it is
        name = f"{FOLDED}{fused}"
        view.add_submodule(name, fuse_batchnorm(producer, bn))
        fused += 1
        bn_node.target, bn_node.args, bn_node.kwargs = name, node.args, node.kwargs
        view.graph.erase_node(node)
    view.graph.lint()
    view.delete_all_unused_submodules()
    view.recompile()
    view.fxkd_made_bytes = sum(  # what the view adds to the model's memory (memory.estimate)
        p.nbytes for name, m in view.named_children() if name.startswith(FOLDED) for p in
        m.parameters()
    )  # fmt: skip
    return view


class FoldAdapters(FxkdPass):
    """Fold each adapter into its producer; ``self.outcome[adapter] = None`` when folded, else
    the reason it was kept."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        calls = module_call_counts(gm)
        self.outcome: dict[str, str | None] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            adapter = gm.get_submodule(str(node.target))
            if not isinstance(adapter, ADAPTER_TYPES):
                continue
            reason = self._fold(gm, node, adapter, calls)
            self.outcome[str(node.target)] = reason
            if reason is None:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            else:
                log.warning("adapter %s not folded: %s", node.target, reason)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, any(r is None for r in self.outcome.values()))

    @staticmethod
    def _fold(gm: fx.GraphModule, node: fx.Node, adapter: nn.Module, calls) -> str | None:
        if isinstance(adapter, KernelAdapter) and adapter.weight is None:
            return None  # never solved: an exact pass-through, dropped
        anchor = node.args[0]
        bn_node, bn = None, None
        producer = affine_module(gm, anchor)
        if producer is None and anchor.op == "call_module":
            bn_node, bn = anchor, gm.get_submodule(str(anchor.target))
            producer_node = anchor.args[0] if anchor.args else None
            producer = (
                affine_module(gm, producer_node) if isinstance(producer_node, fx.Node) else None
            )
            if producer is None or eval_batchnorm(gm, bn_node, spatial_dims(producer)) is None:
                return f"{anchor.name} is neither a conv/linear nor an eval BatchNorm after one"
            anchor = producer_node
        caller = anchor
        if producer is None and site_producer(gm, anchor) is not None:
            producer, _, caller = site_producer(gm, anchor)  # an attention's out_proj
        if producer is None:
            return f"{anchor.name} is not a conv/linear module"
        if calls[str(caller.target)] != 1:
            return f"module {caller.target} is called {calls[str(caller.target)]} times"
        chain = [anchor] + ([bn_node] if bn_node is not None else [])
        for n in chain:
            extra = [u.name for u in n.users if u is not node and u not in chain]
            if extra:
                return f"{n.name} has other users {extra}; folding would change them"
        if bn_node is not None and calls[str(bn_node.target)] != 1:
            return f"BatchNorm {bn_node.target} is called more than once"
        if isinstance(adapter, KernelAdapter):
            a_mat = adapter.weight.detach().double()
            a_vec = (
                adapter.bias.detach().double()
                if adapter.bias is not None
                else a_mat.new_zeros(a_mat.shape[0])
            )
        else:
            a_mat, a_vec = effective_affine(producer, bn)
            c = adapter.bias.detach() if adapter.bias is not None else None
            a_mat, a_vec = compose_pointwise(
                a_mat, a_vec, adapter.weight.detach(), c, adapter.groups
            )
        try:
            write_effective_affine(producer, bn, a_mat, a_vec)
        except ValueError as exc:
            return str(exc)
        return None
