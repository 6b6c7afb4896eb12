"""InsertAdapters: an identity adapter after each aligned student site.

    producer ─▶ [bn] ─▶ users            becomes      producer ─▶ [bn] ─▶ adapter ─▶ users

(a KernelAdapter also takes the producer's input as a second argument). Right after insertion
the student computes exactly what it computed before.
"""

from __future__ import annotations

import logging

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fxkd.align import Alignment, SkippedSite
from fxkd.config import MODES
from fxkd.errors import ConfigError

from .adapter import KernelAdapter, PointwiseAdapter
from .base import FxkdPass

__all__ = ["ADAPTER_PREFIX", "InsertAdapters"]

log = logging.getLogger(__name__)
ADAPTER_PREFIX = "fxkd_adapter_"


class InsertAdapters(FxkdPass):
    """Insert an adapter (``mode``: "pointwise" or "kernel") after every site of ``alignment``.

    Sites that cannot take an adapter in this mode are collected in ``self.skipped``."""

    def __init__(self, alignment: Alignment, mode: str = "kernel") -> None:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not one of {MODES}")
        self.alignment = alignment
        self.mode = mode
        self.skipped: list[SkippedSite] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        nodes = {n.name: n for n in gm.graph.nodes}
        self.skipped = []
        inserted = 0
        for pair in self.alignment.pairs:
            site = pair.site
            if site.anchor not in nodes or site.producer not in nodes:
                self.skipped.append(
                    SkippedSite(
                        site.producer, "node not found in this graph (aligned on another trace?)"
                    )
                )
                continue
            anchor, producer = nodes[site.anchor], nodes[site.producer]
            module = gm.get_submodule(site.module)
            bias = module.bias is not None or site.batchnorm is not None
            # an attention's out_proj input is internal to the (leaf) attention: pointwise only
            inside = producer.op != "call_module"
            if self.mode == "kernel" and not inside:
                if getattr(module, "padding_mode", "zeros") != "zeros":
                    self.skipped.append(
                        SkippedSite(
                            site.producer, "kernel mode needs zero padding; use mode='pointwise'"
                        )
                    )
                    continue
                adapter = KernelAdapter(pair, module, bias=bias)
                args = (anchor, producer.args[0])
            else:
                adapter = PointwiseAdapter(pair, bias=bias)
                args = (anchor,)
            name = _free_name(gm, inserted)
            gm.add_submodule(name, adapter.to(module.weight.device))
            with gm.graph.inserting_after(anchor):
                new = gm.graph.call_module(name, args)
            anchor.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            inserted += 1
        for s in self.skipped:
            log.info("no adapter at %s: %s", s.node, s.reason)
        gm.recompile()
        return PassResult(gm, inserted > 0)


def _free_name(gm: fx.GraphModule, start: int) -> str:
    i = start
    while hasattr(gm, f"{ADAPTER_PREFIX}{i}"):
        i += 1
    return f"{ADAPTER_PREFIX}{i}"
