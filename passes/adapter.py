"""The adapter modules InsertAdapters puts after each site.

``PointwiseAdapter``: ``y = Q x + c`` with Q block-diagonal over the producer's groups (a grouped
1x1 conv; per-channel scale for depthwise; a Linear for channels-last features). Identity when
inserted.

``KernelAdapter``: carries a solved kernel for its producer: once solved it computes
``y = producer_op(x_in; A', a')`` from the producer's *input* ``x_in`` (a second argument);
before that it passes the site's value through unchanged.

Both remember their ``SitePair``; FoldAdapters merges them into the producer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxkd.align import SitePair

__all__ = ["ADAPTER_TYPES", "KernelAdapter", "PointwiseAdapter", "adapter_points"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class PointwiseAdapter(nn.Module):
    """Identity-initialised ``Q x + c``: weight (C, C/groups) as a grouped 1x1 conv."""

    def __init__(self, pair: SitePair, *, bias: bool) -> None:
        super().__init__()
        site = pair.site
        c, g = site.channels, site.groups
        k = c // g
        eye = torch.eye(k).repeat(g, 1)  # (C, C/G): identity block in every group
        self.pair = pair
        self.dims = site.dims
        self.groups = g
        self.kernel_shape = (c, k, *[1] * site.dims)  # as a 1x1 conv's weight
        self.weight = nn.Parameter(eye)
        self.bias = nn.Parameter(torch.zeros(c)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        if self.dims == 0:
            return F.linear(x, w, b)
        g = self.groups
        if _tracing(x) or self._conv_is_faster(x):
            return _CONV[self.dims](x, w.reshape(self.kernel_shape), b, groups=g)
        n, k, positions = x.shape[0], x.shape[1] // g, x[0, 0].numel()
        # as a (batched) GEMM over the (N, G, C/G, positions) view: oneDNN's 1x1 conv
        # reorders to and from its blocked layouts, much slower at few channels per group
        flat = x.reshape(n, g, k, positions)
        y = flat * w.view(1, g, 1, 1) if k == 1 else torch.matmul(w.view(g, k, k), flat)
        if b is not None:
            y = y.add_(b.view(1, g, k, 1))  # in place: the product is a fresh tensor
        return y.view(x.shape)

    def _conv_is_faster(self, x: torch.Tensor) -> bool:
        """Few positions, many channels per group (7×7 maps with 512 channels): oneDNN's 1x1
        conv beats the GEMM there."""
        k = x.shape[1] // self.groups
        return k > 1 and x[0, 0].numel() < k


class KernelAdapter(nn.Module):
    """Passes the site through until solved; then recomputes it from the producer's input."""

    def __init__(self, pair: SitePair, producer: nn.Module, *, bias: bool) -> None:
        super().__init__()
        self.pair = pair
        self.dims = pair.site.dims
        self.has_bias = bias
        self.conv_args = (
            {}
            if self.dims == 0
            else {
                "stride": producer.stride,
                "padding": producer.padding,
                "dilation": producer.dilation,
                "groups": producer.groups,
            }
        )
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None

    def set_kernel(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, y: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return y
        w = self.weight.to(x_in.dtype)
        b = self.bias.to(x_in.dtype) if self.bias is not None else None
        if self.dims == 0:
            return F.linear(x_in, w, b)
        return _CONV[self.dims](x_in, w, b, **self.conv_args)


ADAPTER_TYPES = (PointwiseAdapter, KernelAdapter)


def _tracing(x) -> bool:
    """True while torch.fx, torch.export / torch.compile or the ONNX exporter trace the
    module: the traced graph gets the plain op, eager calibration the fast one."""
    return (
        isinstance(x, torch.fx.Proxy)
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )


def adapter_points(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, nn.Module, object]]:
    """Every adapter call of ``gm`` with its module and the node where it is solved: the
    adapter itself when its site's point is the site, else the site's point (a residual add
    or a seen-through step further on); None when that node is not in the graph."""
    nodes = {n.name: n for n in gm.graph.nodes}
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, ADAPTER_TYPES):
            site = module.pair.site
            found.append(
                (node, module, node if site.point == site.anchor else nodes.get(site.point))
            )
    return found
