"""A stride-1 conv's patch Gram from displaced products of its input, without im2col.

For a 2-D conv with stride 1, kernel offsets ``o_a = k_a·dilation − pad_lo`` (a = (ky, kx)),
output positions ``p ∈ O`` and a zero-padded input ``x`` (C channels per group), the im2col
patch Gram is, block by block (a, b)::

    G_ab = Σ_{n, p ∈ O} x(p + o_a) x(p + o_b)ᵀ = Σ_{q ∈ I ∩ (O + o_a)} x(q) x(q + δ)ᵀ,
    δ = o_b − o_a

so every block is a *displaced product* of the input with itself over the image ``I``,

    H_δ = Σ_{n, q ∈ I} x(q) x(q + δ)ᵀ                  (H_−δ = H_δᵀ)

less the strips of rows and columns of ``I`` that offset ``o_a`` never reads (one row and one
column for a 3×3 "same" conv), by inclusion–exclusion (rows + columns − corners)::

    G_ab = H_δ − Σ_{r ∉ rows(a)} R_r(δ) − Σ_{c ∉ cols(a)} K_c(δ) + Σ_{r, c} Q_rc(δ)

(a strip term is zero when its displaced neighbours fall outside the image, so few are taken).
A k×k kernel has (2k−1)² displacements, half of them up to transposition: 13 C×C products for
a 3×3 kernel where the direct Gram has 81 blocks (45 up to symmetry), a third of its FLOPs at
56×56 and half at 14×14. The cross products with the targets are k² displaced products
``Σ x(p + o_a) y(p)ᵀ``: the direct product's FLOPs, without the k²-times larger patch matrix.

Every product is one GEMM on contiguous slices of a *frame*: the samples' centred inputs laid
out flat, channels first, each image row followed by ``span_x = dilation·(k − 1)`` zero columns
and each image by ``span_y`` zero rows, so that a displacement is a constant flat offset
``dy·W_f + dx`` and every index outside the image, wrapped into a neighbouring row or sample or
not, reads a zero.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from fxkd.solve.patches import conv_padding

__all__ = ["DisplacedProducts", "Geometry", "displaced_products_fit", "displaced_products_pay"]

DEVICES = ("cpu",)
"""Where the displaced products are used by default: where they measured faster than the
direct patch Gram. On a GPU they win on wide convs and lose on narrow, small ones, so "cuda"
waits for an end-to-end A/B with a rule for it (docs/performance.md has the measurements;
``python -m examples.benchmarks.bench_displaced`` takes them)."""

MIN_CHANNELS = 16
"""Channels per group from which the displaced products are used: below it their C×C GEMMs are
too small to run near the machine's rate, and the direct k²C-feature product is cheap anyway."""

MIN_VALUES = 1 << 14
"""Input values per sample and group from which they are used: on smaller inputs their many
small products cost more than they save (measured on a CPU: docs/performance.md)."""

FRAME_ELEMENTS = 1 << 20
"""Input values a frame holds before its products are taken (4 MiB in fp32)."""

MAX_COST_SHARE = 0.6
"""The displaced products are used when their FLOPs (frame padding and strips included) are at
most this share of the direct products' (the Gram's lower block triangle and the cross)."""


def displaced_products_fit(module: nn.Module, x: torch.Tensor) -> bool:
    """True when ``module``'s patch Gram on inputs shaped like ``x`` can be taken as displaced
    products: a 2-D conv with more than one tap, stride 1, zero padding no wider than the
    kernel's span."""
    return _fitting_geometry(module, x) is not None


def _fitting_geometry(module: nn.Module, x: torch.Tensor) -> Geometry | None:
    """The conv's geometry on inputs shaped like ``x`` when the displaced products fit it."""
    if not isinstance(module, nn.Conv2d) or x.dim() != 4:
        return None
    if tuple(module.stride) != (1, 1) or module.padding_mode != "zeros":
        return None
    if math.prod(module.kernel_size) == 1:
        return None
    geometry = Geometry(module, (x.shape[2], x.shape[3]))
    return geometry if geometry.valid else None


def displaced_products_pay(module: nn.Module, x: torch.Tensor) -> bool:
    """True when they fit and are cheaper than the direct product: on a device of ``DEVICES``,
    at least ``MIN_CHANNELS``
    input channels and ``MIN_VALUES`` input values per group and sample, and FLOPs at most
    ``MAX_COST_SHARE`` of the direct product's."""
    geometry = _fitting_geometry(module, x) if x.device.type in DEVICES else None
    if geometry is None:
        return False
    channels = x.shape[1] // module.groups
    if channels < MIN_CHANNELS or channels * x.shape[2] * x.shape[3] < MIN_VALUES:
        return False
    return geometry.cost_share() <= MAX_COST_SHARE


Displacement = tuple[int, int]


class Geometry:
    """Offsets, frame and strips of a stride-1 2-D conv on (H, W) inputs."""

    def __init__(self, module: nn.Module, spatial: tuple[int, int]) -> None:

        pads = conv_padding(module)
        self.spatial = spatial
        self.kernel = tuple(module.kernel_size)
        spans = [d * (k - 1) for d, k in zip(module.dilation, self.kernel, strict=True)]
        self.spans = tuple(spans)
        self.out = tuple(
            s + lo + hi - sp for s, (lo, hi), sp in zip(spatial, pads, spans, strict=True)
        )
        self.valid = (
            all(0 <= lo <= sp and 0 <= hi <= sp for (lo, hi), sp in zip(pads, spans, strict=True))
            and min(self.out) >= 1
        )
        # o[d][k]: where kernel tap k of dimension d reads, relative to the output position
        self.offsets = tuple(
            tuple(k * module.dilation[d] - pads[d][0] for k in range(self.kernel[d]))
            for d in range(2)
        )
        self.taps: list[Displacement] = list(itertools.product(*self.offsets))
        self.frame = (spatial[0] + spans[0], spatial[1] + spans[1])  # (H_f, W_f)
        self.lead = spans[0] * self.frame[1] + spans[1]  # zeros before and after the frames
        self.excluded = [  # per tap: the rows / columns of the image it never reads
            tuple(
                tuple(r for r in range(spatial[d]) if not o[d] <= r < o[d] + self.out[d])
                for d in range(2)
            )
            for o in self.taps
        ]
        pairs = [(a, b) for a in range(len(self.taps)) for b in range(len(self.taps))]
        self.half = sorted({self._canonical(self.delta(a, b)) for a, b in pairs})
        self.strips: dict[tuple, list[Displacement]] = {}  # ("row", r) / ("col", c) / corner
        for a, b in pairs:
            dy, dx = self.delta(a, b)
            rows, cols = self.excluded[a]
            h, w = spatial
            for r in rows:
                if 0 <= r + dy < h:
                    self._need(("row", r), (dy, dx))
            for c in cols:
                if 0 <= c + dx < w:
                    self._need(("col", c), (dy, dx))
            for r, c in itertools.product(rows, cols):
                if 0 <= r + dy < h and 0 <= c + dx < w:
                    self._need(("corner", r, c), (dy, dx))

    def delta(self, a: int, b: int) -> Displacement:
        (ay, ax), (by, bx) = self.taps[a], self.taps[b]
        return by - ay, bx - ax

    @staticmethod
    def _canonical(delta: Displacement) -> Displacement:
        """δ or −δ, whichever is lexicographically ≥ (0, 0): H_−δ = H_δᵀ."""
        return delta if delta >= (0, 0) else (-delta[0], -delta[1])

    def _need(self, strip: tuple, delta: Displacement) -> None:
        deltas = self.strips.setdefault(strip, [])
        if delta not in deltas:
            deltas.append(delta)

    def flat(self, delta: Displacement) -> int:
        """The flat frame offset of a displacement."""
        return delta[0] * self.frame[1] + delta[1]

    def cost_share(self) -> float:
        """FLOPs of the displaced products over the direct products' (per C² and sample, the
        cross taken with as many targets as channels)."""
        (h, w), (hf, wf), length = self.spatial, self.frame, math.prod(self.out)
        taps = len(self.taps)
        strips = sum(
            len(d) * (w if s[0] == "row" else h if s[0] == "col" else 1)
            for s, d in self.strips.items()
        )
        displaced = len(self.half) * hf * wf + strips + taps * hf * wf
        panels = 5 / 8 if taps * MIN_CHANNELS >= 128 else 1.0  # CentredProducts.panels
        return displaced / (panels * taps * taps * length + taps * length)


class DisplacedProducts:
    """Accumulates a stride-1 conv's patch Gram ``Σ x_pᵀx_p`` and cross ``Σ x_pᵀ y`` (x_p the
    im2col patches of the centred input, per group) as displaced products; ``totals`` assembles
    them in fp64 in the layout of ``NormalEquations`` (features ``c·k² + tap``, like
    ``weight[o].flatten()``). fp32 products are added to fp64 totals by ``flush``."""

    def __init__(
        self, module: nn.Module, spatial: tuple[int, int], groups: int, channels: int,
        targets: int, dtype: torch.dtype, device: torch.device,
    ) -> None:  # fmt: skip
        self.geometry = Geometry(module, spatial)
        self.groups, self.channels, self.targets = groups, channels, targets
        self.dtype, self.device = dtype, device
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # x and y frames
        self._filled = 0  # samples written into the frames and not yet multiplied
        self._acc = self._zeros(dtype)
        self._totals: dict[str, torch.Tensor] | None = None
        self.rows = 0  # since the last flush
        self.cross_only = False  # skip the Gram's products (a re-solve against new targets)

    def _zeros(self, dtype) -> dict[str, torch.Tensor]:
        g, c, geo = self.groups, self.channels, self.geometry
        z = {"dtype": dtype, "device": self.device}
        sums = {
            "half": torch.zeros(g, len(geo.half), c, c, **z),
            "cross": torch.zeros(g, len(geo.taps), c, self.targets, **z),
        }
        for strip, deltas in geo.strips.items():
            sums[repr(strip)] = torch.zeros(g, c, len(deltas) * c, **z)
        return sums

    def _frames(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The x and y frame buffers, (G, C or K, lead + capacity·F + lead), room for ``n``
        more samples: multiplied out first when full. Their padding is zeroed once; only image
        parts are written after. The capacity holds about FRAME_ELEMENTS input values: the
        products' inner dimension is long enough for the GEMMs to run near the machine's rate
        (short frames run the same products markedly slower)."""
        geo = self.geometry
        size = math.prod(geo.frame)
        if self._buffers is None or self._buffers[0].shape[-1] < 2 * geo.lead + n * size:
            self._multiply()
            capacity = max(n, -(-FRAME_ELEMENTS // (self.groups * self.channels * size)))
            self._buffers = tuple(
                torch.zeros(
                    self.groups, width, 2 * geo.lead + capacity * size,
                    dtype=self.dtype, device=self.device,
                )
                for width in (self.channels, self.targets)
            )  # fmt: skip
        elif self._buffers[0].shape[-1] < 2 * geo.lead + (self._filled + n) * size:
            self._multiply()
        return self._buffers

    def _view(self, buf: torch.Tensor) -> torch.Tensor:
        """The frames of ``buf`` as (G, channels, capacity, H_f, W_f)."""
        (hf, wf), lead = self.geometry.frame, self.geometry.lead
        n = (buf.shape[-1] - 2 * lead) // (hf * wf)
        return buf[..., lead : lead + n * hf * wf].view(*buf.shape[:2], n, hf, wf)

    def add(
        self, x: torch.Tensor, mu: torch.Tensor, y: torch.Tensor, nu: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the patches of ``x − μ`` (x: (n, G·C, H, W), μ: (G·C,)) against ``y − ν`` (y:
        (n, G, K, L), ν: (G, K)); returns the centred input and target summed over the samples,
        (G·C, H, W) and (G, K, L) in fp64, for the mask algebra of the shift terms. The products
        are taken when the frames are full (or on ``flush``)."""
        geo, g, c, k = self.geometry, self.groups, self.channels, self.targets
        n = x.shape[0]
        (h, w), (ho, wo) = geo.spatial, geo.out
        xbuf, ybuf = self._frames(n)
        at = slice(self._filled, self._filled + n)
        frames = self._view(xbuf)[:, :, at, :h, :w]
        torch.sub(
            x.view(n, g, c, h, w).permute(1, 2, 0, 3, 4),
            mu.to(self.dtype).view(g, c, 1, 1, 1),
            out=frames,
        )
        targets = self._view(ybuf)[:, :, at, :ho, :wo]
        torch.sub(
            y.view(n, g, k, ho, wo).permute(1, 2, 0, 3, 4),
            nu.to(self.dtype).view(g, k, 1, 1, 1),
            out=targets,
        )
        self._filled += n
        self.rows += n * ho * wo
        x_sum = frames.sum(dim=2, dtype=torch.float64).reshape(g * c, h, w)
        y_sum = targets.sum(dim=2, dtype=torch.float64).reshape(g, k, ho * wo)
        return x_sum, y_sum

    def _multiply(self) -> None:
        """The displaced products of the samples in the frames, added to the fp32 sums."""
        n = self._filled
        if not n:
            return
        geo, acc = self.geometry, self._acc
        xbuf, ybuf = self._buffers
        lead, span = geo.lead, n * math.prod(geo.frame)
        base = xbuf[..., lead : lead + span]
        for i, delta in enumerate(() if self.cross_only else geo.half):
            shifted = xbuf[..., lead + geo.flat(delta) : lead + geo.flat(delta) + span]
            acc["half"][:, i].baddbmm_(base, shifted.transpose(-1, -2))
        y_flat = ybuf[..., lead : lead + span]
        for i, tap in enumerate(geo.taps):
            read = xbuf[..., lead + geo.flat(tap) : lead + geo.flat(tap) + span]
            acc["cross"][:, i].baddbmm_(read, y_flat.transpose(-1, -2))
        frames = self._view(xbuf)[:, :, :n]
        for strip, deltas in () if self.cross_only else geo.strips.items():
            own, near = self._strip(xbuf, frames, strip, deltas, n)
            acc[repr(strip)].baddbmm_(own, near.transpose(-1, -2))
        self._filled = 0

    def _strip(self, buf, frames, strip, deltas, n):
        """A strip's own values (G, C, m) and its displaced neighbours (G, len(deltas)·C, m),
        m = n·(strip length), for one GEMM."""
        geo, g, c = self.geometry, self.groups, self.channels
        (h, w), (hf, wf) = geo.spatial, geo.frame
        frame_size = hf * wf
        start = buf.storage_offset() + geo.lead
        st = buf.stride()
        if strip[0] == "row":
            own = frames[:, :, :, strip[1], :w]
            size, inner, at = (g, c, n, w), 1, strip[1] * wf
        elif strip[0] == "col":
            own = frames[:, :, :, :h, strip[1]]
            size, inner, at = (g, c, n, h), wf, strip[1]
        else:
            own = frames[:, :, :, strip[1], strip[2]]
            size, inner, at = (g, c, n), None, strip[1] * wf + strip[2]
        stride = (st[0], st[1], frame_size) + ((inner,) if inner is not None else ())
        near = torch.stack(
            [buf.as_strided(size, stride, start + at + geo.flat(d)) for d in deltas], dim=1
        )
        return own.reshape(g, c, -1), near.reshape(g, len(deltas) * c, -1)

    def flush(self) -> None:
        """Take the pending products and add the fp32 sums to the fp64 totals."""
        self._multiply()
        if not self.rows:
            return
        if self._totals is None:
            self._totals = {key: a.to(torch.float64, copy=True) for key, a in self._acc.items()}
        else:
            for key, a in self._acc.items():
                self._totals[key].add_(a)
        for a in self._acc.values():
            a.zero_()
        self.rows = 0

    def reset(self) -> None:
        """Forget the totals (they were handed on, e.g. reduced over ranks)."""
        self.flush()
        self._totals = None

    def totals(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gram (G, D, D), cross (G, D, K)) in fp64 over every flushed product, D = C·k²,
        or None before any."""
        self.flush()
        if self._totals is None:
            return None
        geo, t, c = self.geometry, self._totals, self.channels
        taps = len(geo.taps)
        gram = torch.empty(self.groups, c, taps, c, taps, dtype=torch.float64, device=self.device)
        index = {d: i for i, d in enumerate(geo.half)}
        slots = {s: {d: j for j, d in enumerate(ds)} for s, ds in geo.strips.items()}
        for a, b in itertools.product(range(taps), repeat=2):
            delta = geo.delta(a, b)
            if delta in index:
                block = t["half"][:, index[delta]].clone()
            else:
                block = t["half"][:, index[(-delta[0], -delta[1])]].transpose(-1, -2).clone()
            rows, cols = geo.excluded[a]
            strips = [(("row", r), -1.0) for r in rows] + [(("col", q), -1.0) for q in cols]
            strips += [(("corner", r, q), 1.0) for r, q in itertools.product(rows, cols)]
            for strip, sign in strips:
                j = slots.get(strip, {}).get(delta)
                if j is not None:
                    block.add_(t[repr(strip)][:, :, j * c : (j + 1) * c], alpha=sign)
            gram[:, :, a, :, b] = block
        d = c * taps
        cross = t["cross"].permute(0, 2, 1, 3).reshape(self.groups, d, self.targets)
        return gram.view(self.groups, d, d), cross
