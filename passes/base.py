"""FxkdPass: a torch.fx PassBase that lints the graph after it runs."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase

__all__ = ["FxkdPass"]


class FxkdPass(PassBase):
    """Base of fxkd's passes: ``pass(gm) -> PassResult``; mutates ``gm`` in place.

    ``requires`` is a no-op; ``ensures`` runs ``graph.lint()`` so a pass never leaves a broken
    graph behind. Works alone, in ``torch.fx``'s PassManager, or in any ``gm -> PassResult``
    toolchain."""

    def requires(self, graph_module: fx.GraphModule) -> None:
        return None

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()
