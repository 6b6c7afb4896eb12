"""Pointwise normal equations one level down, for sites whose producer widens.

A pointwise site's features are its producer's output ``x = A h + a`` (BatchNorm folded in).
When the producer is a 1×1 conv or a Linear with fewer inputs than outputs (a bottleneck's
expansion, a projection shortcut), the sums over the C_in-dimensional ``h`` are cheaper and
carry the same information::

    Σ [x 1][x 1]ᵀ = M (Σ [h 1][h 1]ᵀ) Mᵀ,   Σ [x 1] yᵀ = M Σ [h 1] yᵀ,   M = [[A, a], [0, 1]]

so calibration accumulates them on ``h`` (the producer's input patches: the input itself, taken
at the stride's positions) and maps them once per solve (``NormalEquations.project``). The
per-position cost falls from ≈ 5/8·C² + C·K to ≈ 5/8·C_in² + C_in·K multiply-adds: 11× less at a
resnet50 bottleneck output with its interior pruned to C/8.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxkd.solve.patches import conv_padding
from fxkd.solve.products import SYMMETRIC_PANELS_FROM

__all__ = ["MAX_COST_SHARE", "producer_input", "update_cost"]

MAX_COST_SHARE = 0.7
"""The producer's input is used when its normal equations cost at most this share of the
output's (the mapping, a few fp64 products per solve, is not counted)."""


def producer_input(gm: fx.GraphModule, adapter: fx.Node, module: nn.Module) -> fx.Node | None:
    """The node whose value feeds the producer of ``adapter``'s site, when the site's pointwise
    system is cheaper from it: an ungrouped site, a producer that is a Linear or an
    ungrouped, unpadded 1×1 conv reading that node directly (after an optional BatchNorm
    between it and the adapter), and normal equations on its input at most
    ``MAX_COST_SHARE`` of those on its output. None otherwise."""
    site = module.pair.site
    if site.groups != 1 or not site.module:
        return None
    producer = gm.get_submodule(site.module)
    if isinstance(producer, nn.Linear):
        width = producer.in_features
    elif isinstance(producer, nn.modules.conv._ConvNd):
        if producer.transposed or producer.groups != 1:
            return None
        if any(k != 1 for k in producer.kernel_size) or any(map(any, conv_padding(producer))):
            return None
        width = producer.in_channels
    else:
        return None
    anchor = adapter.args[0]
    if isinstance(anchor, fx.Node) and anchor.name == site.batchnorm:
        anchor = anchor.args[0]
    if not (isinstance(anchor, fx.Node) and anchor.op == "call_module"):
        return None
    if anchor.target != site.module or len(anchor.args) != 1 or anchor.kwargs:
        return None
    source = anchor.args[0]
    if not isinstance(source, fx.Node):
        return None
    if update_cost(width, site.channels) > MAX_COST_SHARE * update_cost(
        site.channels, site.channels
    ):
        return None
    return source


def update_cost(features: int, targets: int) -> float:
    """Multiply-adds per row of the normal equations' updates (Gram and cross)."""
    gram = features * features * (5 / 8 if features >= SYMMETRIC_PANELS_FROM else 1.0)
    return gram + features * targets
