"""Streaming normal equations for batched linear least squares.

P independent systems (one per group of a grouped producer) share the row stream::

    W_p* = argmin_W  Σ_rows || x_p W + 1·c_p − y_p ||²      x_p: (rows, D), y_p: (rows, K)

``NormalEquations`` accumulates ``G = [x 1]ᵀ[x 1]`` and ``B = [x 1]ᵀ y`` chunk by chunk, by one
of its routes: rows (``update``/``update_blocks``), a conv's im2col patches
(``update_patches``: built centred, ``fxkd.solve.patches``) or, for stride-1 2-D convs, displaced
products of the input (``fxkd.solve.displaced``); then, for a projected site, the sums are mapped
to the wide features (``project``) and solved at the narrow side (``fxkd.solve.narrow``). The
products of centred rows are ``fxkd.solve.products``' job, the diagnosis
``fxkd.solve.conditioning``'s, the ridge solve ``fxkd.solve.ridge``'s; this module holds the
shift algebra that ties them together. The sums are over rows, so data-parallel calibration is
one ``all_reduce`` per solve.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from fxkd.solve.conditioning import Conditioning, narrow_conditioning, wide_conditioning
from fxkd.solve.displaced import DisplacedProducts, displaced_products_pay
from fxkd.solve.narrow import BlockAffine, narrow_solve
from fxkd.solve.patches import centred_patch_rows, patch_mask, summed_patches
from fxkd.solve.products import CentredProducts, shifted, work_dtype
from fxkd.solve.ridge import ridge_solve

__all__ = ["Conditioning", "NormalEquations", "all_reduce_sum", "layer_equations"]

log = logging.getLogger(__name__)


class NormalEquations:
    """Accumulates and solves P least-squares systems with D features (+bias) and K targets.

    The rows arrive as *centred* features ``x_c`` with a known shift ``M``, ``x = x_c + M``:

    - ``update_blocks``: ``M = 1μᵀ``, μ the first update's feature means (every feature shifted
      alike);
    - ``update_patches``: a conv's im2col patches of ``x − μ_c`` (μ_c per input channel, zero
      padding), so ``M[row, f] = μ_f · m[pos(row), k(f)]``, ``m`` the in-bounds mask of kernel
      offset ``k(f)`` at an output position (1 inside, 0 where the patch reads padding). With
      ``E`` (nk, D), ``E[k, f] = μ_f·[k(f) = k]``, the masked sums ``S = Σ_rows x_cᵀ m``,
      ``T = Σ_rows y_cᵀ m``, the counts ``N = mᵀm`` (summed over rows), ``c = 1ᵀm`` and
      ``y = y_c + 1νᵀ``::

          xᵀx = x_cᵀx_c + S E + (S E)ᵀ + Eᵀ N E
          xᵀy = x_cᵀy_c + s_x νᵀ + Eᵀ Tᵀ + (Eᵀ c) νᵀ,     1ᵀx = s_x + Eᵀ c

      (``update_blocks`` is the case nk = 1, m = 1, where S = s_x and N = c = rows).
      For a stride-1 2-D conv with enough channels ``x_cᵀx_c`` and ``x_cᵀy_c`` are taken as
      displaced products of the centred input (``fxkd.solve.displaced``: no patch matrix, a third
      to a half of the Gram's FLOPs), the same sums.

    Per update only the fp32 products ``x_cᵀx_c`` (its lower block triangle) and ``x_cᵀy_c``
    (``fxkd.solve.products.CentredProducts``) and the small sums are taken; the D×D shift terms
    are added once, in fp64, when ``gram`` / ``cross`` are read (they are linear in the sums:
    μ, ν stay fixed after the first update). Rounding thus
    scales with the features' spread, not their mean (BatchNorm/ReLU features have large
    means)."""

    def __init__(
        self,
        partitions: int,
        features: int,
        targets: int,
        *,
        bias: bool,
        device: torch.device | str = "cpu",
    ) -> None:
        self.bias = bias
        self.features = features
        self.targets = targets
        self.partitions = partitions
        self.device = torch.device(device)
        self._base: tuple[torch.Tensor, torch.Tensor] | None = None  # reduced over ranks
        self._products = CentredProducts(features)  # the rows and im2col routes' products
        self._stats: dict[str, torch.Tensor] = {}  # s_x, s_y (and S, T for patches), fp64
        self._pending_rows = 0  # rows in _stats (since the sums were last reduced over ranks)
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None  # μ (P, D), ν (P, K)
        self._mask: torch.Tensor | None = None  # m (L, nk) of update_patches; None: uniform
        self._producer = None  # update_patches' conv: its patches of the summed inputs give S
        self._displaced: DisplacedProducts | None = None  # update_patches' stride-1 products
        self._displaced_route: bool | None = None  # patches by displaced products (decided once)
        self._final: tuple[torch.Tensor, torch.Tensor] | None = None
        self._narrow: tuple[BlockAffine, torch.Tensor, torch.Tensor] | None = None  # M, G_h, B_h
        self._gram_of: NormalEquations | None = None  # retargeted: whose Gram this system has
        self.rows = 0

    def retargeted(self) -> NormalEquations:
        """An empty system for the same rows against new targets: it takes only the cross
        products ``x_cᵀy_c`` (and the small sums), and its Gram is this one's (as accumulated,
        before any ``project``). Feed it exactly the rows this one got, in any chunking; the
        shifts μ, ν stay this system's (the algebra is exact for any shift). For re-solves
        whose targets change and whose features do not (``fxkd.solve.relax``): the D×D
        products, the bulk of the work, are not taken again."""
        if self._shift is None:
            raise RuntimeError("NormalEquations.retargeted: no rows were added")
        out = NormalEquations(
            self.partitions, self._wide_features, self.targets, bias=self.bias, device=self.device
        )
        out._gram_of = self
        out._shift = self._shift
        out._products.cross_only = True
        out._displaced_route = self._displaced_route  # the same rows, by the same route
        return out

    @property
    def _wide_features(self) -> int:
        return self._narrow[1].shape[-1] - int(self.bias) if self._narrow else self.features

    def _wide_gram(self) -> torch.Tensor:
        """The Gram as accumulated (over the features rows were added with)."""
        return self._narrow[1] if self._narrow is not None else self._finalize()[0]

    @property
    def route(self) -> str:
        """How the sums are taken: ``"rows"``, ``"patches"`` (im2col), ``"displaced"`` or, after
        ``project``, ``"projected"``."""
        if self._narrow is not None:
            return "projected"
        if self._displaced is not None:
            return "displaced"
        return "patches" if self._mask is not None else "rows"

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows given row-major: ``x`` (P, rows, D), ``y`` (P, rows, K)."""
        self.update_blocks(x.transpose(-1, -2)[None], y.transpose(-1, -2)[None])

    def update_blocks(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows given feature-major, as layers hold them: ``x`` (B, P, D, L) and ``y``
        (B, P, K, L), rows = B·L (e.g. a conv output (N, C, H, W) viewed as (N, G, C/G, H·W):
        no copy). Any float dtype. The shift is written straight into a (P, D, rows) buffer,
        so shifting is also the one copy that puts the rows in GEMM layout."""
        self._check_open()
        dtype = work_dtype(x)
        if self._shift is None:  # fp32-rounded shifts: the algebra is exact for any shift
            self._set_shift(x.to(dtype).mean(dim=(0, 3)), y, dtype)
        self._add(shifted(x, self._shift[0].to(x.device)[:, None, :], dtype), y)

    def update_patches(self, x: torch.Tensor, producer, y: torch.Tensor) -> None:
        """Add the rows of a conv ``producer``'s input ``x`` (B, C, *S) as its im2col patches
        (what its kernel multiplies; features per group ordered like ``weight[o].flatten()``),
        against ``y`` (B, P, K, L), P = the conv's groups. The patches are built once, already
        centred and in GEMM layout (``centred_patch_rows``): no separate shift pass over the
        k²-times larger patch matrix."""
        self._check_open()
        dtype = work_dtype(x)
        g, c = producer.groups, x.shape[1]
        taps = math.prod(producer.kernel_size)
        if self._shift is None:
            mu_c = x.to(dtype).mean(dim=(0, *range(2, x.dim())))
            mu = mu_c.view(g, c // g, 1).expand(g, c // g, taps).reshape(g, -1)
            self._set_shift(mu, y, dtype)
        mu_c = self._shift[0].view(g, c // g, taps)[:, :, 0].reshape(-1).to(x.device, dtype)
        if self._displaced_route is None:  # the producer and the input's shape stay the same
            self._displaced_route = displaced_products_pay(producer, x)
        if self._displaced_route:
            self._add_displaced(x.to(dtype), producer, mu_c, y)
            return
        xc, self._mask, x_total = centred_patch_rows(x.to(dtype), producer, mu_c)
        self._producer = producer
        self._add(xc, y, x_total)

    def _add_displaced(self, x, producer, mu_c, y) -> None:
        """``update_patches`` for a stride-1 2-D conv: the patch Gram and cross as displaced
        products of the centred input (``fxkd.solve.displaced``: no patch matrix, about a third to
        a half of the Gram's FLOPs), the shift terms' sums from the summed inputs."""
        b, p, k, length = y.shape
        if self._displaced is None:
            spatial = (x.shape[2], x.shape[3])
            self._displaced = DisplacedProducts(
                producer, spatial, p, x.shape[1] // p, k, x.dtype, x.device
            )
            self._displaced.cross_only = self._gram_of is not None
            self._mask = patch_mask(producer, spatial, x.device)
            self._producer = producer
        x_total, y_sum = self._displaced.add(x, mu_c, y, self._shift[1])
        self._count(x_total, y_sum, b * length)
        if self._displaced.rows >= CentredProducts.FLUSH_ROWS:
            self._displaced.flush()

    def _check_open(self) -> None:
        if self._narrow is not None:
            raise RuntimeError("NormalEquations.project was called: no more updates")

    def _set_shift(self, mu: torch.Tensor, y: torch.Tensor, dtype) -> None:
        nu = y.to(dtype).mean(dim=(0, 3))
        self._shift = (mu.to(torch.float64), nu.to(torch.float64))

    def _add(self, xc: torch.Tensor, y: torch.Tensor, x_total: torch.Tensor | None = None) -> None:
        """Accumulate centred rows ``xc`` (P, D, B·L) against targets ``y`` (B, P, K, L); for
        patches also the centred conv input summed over the B samples, ``x_total`` (C, *S), for
        the masked sums S, T (a uniform shift needs only the column sums)."""
        b, p, k, length = y.shape
        nu = self._shift[1].to(y.device)
        yc = shifted(y, nu[:, None, :], xc.dtype)  # (P, K, rows)
        self._products.add(xc, yc)
        if x_total is None:
            self._count(xc.sum(dim=-1).double(), yc.sum(dim=-1).double(), b * length)
        else:
            self._count(x_total, yc.view(p, k, b, length).sum(dim=2).double(), b * length)

    def _count(self, x_sum: torch.Tensor, y_sum: torch.Tensor, rows: int) -> None:
        """Add ``rows`` rows' sums of the centred features and targets: column sums (P, D) /
        (P, K) for a uniform shift; for patches, the conv input and the targets summed over the
        samples, (C, *S) / (P, K, L), which ``_masked_sums`` turns into s_x, S, s_y, T once per
        read (all are linear in these sums)."""
        stats = {"sx": x_sum, "sy": y_sum} if self._mask is None else {"xt": x_sum, "yt": y_sum}
        for key, value in stats.items():
            self._stats[key] = self._stats[key] + value if key in self._stats else value
        self.rows += rows
        self._pending_rows += rows
        self._final = None

    def _flush(self) -> None:
        """Add every route's pending fp32 products to its fp64 sums."""
        if self._displaced is not None:
            self._displaced.flush()
        self._products.flush()

    def _finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gram, cross): the flushed sums plus the shift terms, in fp64, written in place into
        one new pair of matrices (or a copy of the sums reduced over ranks)."""
        if self._final is not None:
            return self._final
        if self._narrow is not None:  # the projected sums, formed only when asked for
            affine, gram, cross = self._narrow
            m = affine.mapping
            self._final = (m @ gram @ m.transpose(-1, -2), m @ cross)
            return self._final
        self._flush()
        d, p = self.features, self.partitions
        width = d + int(self.bias)
        if self._base is None:
            f64 = {"dtype": torch.float64, "device": self.device}
            gram = torch.empty(p, width, width, **f64)
            cross = torch.empty(p, width, self.targets, **f64)
            gram[:, d:].zero_()  # the bias row and column
            gram[:, :, d:].zero_()
            cross[:, d:].zero_()
            features, targets = gram[:, :d, :d], cross[:, :d]
            if self._products.xx is not None:  # one pass: a copy, not zeros plus a sum
                features.copy_(self._products.xx)
                targets.copy_(self._products.xy)
            else:
                features.zero_()
                targets.zero_()
        else:
            gram, cross = (t.clone() for t in self._base)
            features, targets = gram[:, :d, :d], cross[:, :d]
            if self._products.xx is not None:
                features += self._products.xx
                targets += self._products.xy
        displaced = self._displaced.totals() if self._displaced is not None else None
        if displaced is not None:  # the full Gram, not a block triangle: mirroring keeps it
            features += displaced[0]
            targets += displaced[1]
        self._products.mirror(features)  # the upper triangle the panels skipped
        if self._stats:
            st, n = self._stats, float(self._pending_rows)
            mu, nu = (t.to(self.device) for t in self._shift)
            if self._mask is None:  # uniform shift: one offset, m = 1, S = s_x, T = s_y
                m = torch.ones(1, 1, dtype=torch.float64, device=self.device)
                masked_x, masked_y = st["sx"][:, :, None], st["sy"][:, :, None]
            else:
                m = self._mask.to(self.device)
                st = self._masked_sums(m)
                masked_x, masked_y = st["S"], st["T"]
            samples = n / m.shape[0]  # every sample contributes m's rows once
            counts, offset_rows = samples * (m.T @ m), samples * m.sum(dim=0)  # N (nk, nk), c
            taps = m.shape[1]
            kf = torch.arange(d, device=self.device) % taps  # k(f)
            e = torch.zeros(p, taps, d, dtype=torch.float64, device=self.device)
            e.scatter_(1, kf.expand(p, d)[:, None, :], mu[:, None, :])  # E (P, nk, D)
            half = masked_x + 0.5 * (e.transpose(1, 2) @ counts)  # S + ½EᵀN: (P, D, nk)
            features.baddbmm_(half, e)  # + S E + ½ EᵀNE, and its transpose: no D×D temporary
            features.baddbmm_(e.transpose(1, 2), half.transpose(1, 2))
            shift_sum = (e.transpose(1, 2) @ offset_rows[None, :, None])[..., 0]  # Eᵀc: (P, D)
            targets += (st["sx"] + shift_sum)[:, :, None] * nu[:, None, :]
            targets += e.transpose(1, 2) @ masked_y.transpose(1, 2)
            if self.bias:
                colsum = st["sx"] + shift_sum
                gram[:, d, :d] += colsum
                gram[:, :d, d] += colsum
                gram[:, d, d] += n
                cross[:, d] += st["sy"] + n * nu
        if self._gram_of is not None:  # the Gram is the source system's (same rows)
            gram = self._gram_of._wide_gram()
        self._final = (gram, cross)
        return self._final

    def _masked_sums(self, m: torch.Tensor) -> dict[str, torch.Tensor]:
        """s_x, s_y and the masked sums S = Σ_rows x_cᵀm, T = Σ_rows y_cᵀm from the summed conv
        inputs and targets: S is the mask applied to the patches of the summed input."""
        x_sum = summed_patches(self._stats["xt"].to(self.device), self._producer)  # (P, D, L)
        y_sum = self._stats["yt"].to(self.device)
        return {"sx": x_sum.sum(dim=-1), "sy": y_sum.sum(dim=-1), "S": x_sum @ m, "T": y_sum @ m}

    @property
    def gram(self) -> torch.Tensor:
        """(P, D[+1], D[+1]) fp64: ``[x 1]ᵀ[x 1]`` over every row added."""
        return self._finalize()[0]

    @property
    def cross(self) -> torch.Tensor:
        """(P, D[+1], K) fp64: ``[x 1]ᵀ y``."""
        return self._finalize()[1]

    def all_reduce(self) -> None:
        """Sum the statistics (and the row count) over ranks when torch.distributed is
        initialised (else nothing to do). Each rank's shift terms are applied first (ranks
        shift differently); the reduced sums become the base that later updates add to."""
        self._check_open()
        if not (dist.is_available() and dist.is_initialized()):
            return
        gram, cross = self._finalize()
        rows = torch.tensor([float(self.rows)], dtype=torch.float64, device=gram.device)
        # a retargeted system's Gram is its source's, reduced over ranks already
        reduced = gram if self._gram_of is not None else all_reduce_sum(gram)
        self._base = (reduced, all_reduce_sum(cross))
        self.rows = int(all_reduce_sum(rows).item())
        self._products.reset()
        if self._displaced is not None:
            self._displaced.reset()
        self._stats = {}
        self._pending_rows = 0
        self._final = self._base

    def project(self, mapping: torch.Tensor, blocks: Sequence[tuple[int, int]] = ()) -> None:
        """Turn the sums over features ``h`` into those over ``x = A h + a``: ``mapping`` (P,
        D'[+1], D[+1]) takes ``[h 1]`` to ``[x 1]`` (``[[A, a], [0, 1]]`` with a bias, else A),
        so gram = M G Mᵀ and cross = M B (``fxkd.solve.projection``). Call it after the last update
        (and ``all_reduce``); the system then has D' features. The mapped sums are formed only
        when ``gram`` / ``cross`` are read: ``conditioning`` and ``solve`` work at the narrow
        side (``fxkd.solve.narrow``: D×D instead of D'×D'), taking A's diagonal ``blocks`` (rows,
        columns: the members of a joint system) one at a time."""
        self._check_open()
        gram, cross = self._finalize()
        self._narrow = (BlockAffine(mapping.to(gram), self.bias, blocks), gram, cross)
        self.features = mapping.shape[-2] - int(self.bias)
        self._final = self._base = None
        self._products = CentredProducts(self.features)
        self._displaced = None  # the shift stays: a retargeted system takes the same rows
        self._stats, self._pending_rows, self._mask = {}, 0, None

    def conditioning(self) -> Conditioning:
        """Dead and dependent features and a condition bound of the accumulated features
        (``fxkd.solve.conditioning``; at the narrow side for projected sums)."""
        if self._narrow is not None:
            affine, gram, _ = self._narrow
            return narrow_conditioning(gram, affine)
        return wide_conditioning(self.gram, self.features, self.rows, self.bias)

    def solve(self, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
        """The (P, D[+1], K) ridge solution (``fxkd.solve.ridge``); ``prior`` (same shape) is
        what the ridge shrinks towards."""
        if self._narrow is not None:  # projected: solved at the narrow side when it can be
            affine, gram, cross = self._narrow
            w, ok = narrow_solve(gram, cross, affine, ridge, prior)
            if ok:
                return w
            log.debug("narrow-side solve failed: solving the mapped system")
        return ridge_solve(self.gram, self.cross, self.features, ridge, prior)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks when torch.distributed is initialised (else ``t``), reduced on
    the device the process group's backend takes (NCCL: this rank's GPU; gloo: the CPU) and
    returned on ``t``'s device."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    if dist.get_backend() == "nccl":
        where = torch.device("cuda", torch.cuda.current_device())
    else:
        where = torch.device("cpu")
    buf = t.to(where)
    dist.all_reduce(buf)
    return buf.to(t.device)


def layer_equations(
    layer: nn.Module, inputs: Iterable[torch.Tensor], outputs: Iterable[torch.Tensor]
) -> NormalEquations:
    """One system (with a bias) of a conv's or linear layer's ``outputs`` (all its channels)
    on its ``inputs``' features, chunk by chunk: a conv's im2col patches, ordered like
    ``weight[o].flatten()``, or a linear layer's inputs (rows over the leading dims). Summed
    over ranks, so every rank solves the same system."""
    conv = isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    k, d = layer.weight.shape[0], layer.weight[0].numel()
    eqs = None
    for x, y in zip(inputs, outputs, strict=True):
        if eqs is None:
            eqs = NormalEquations(1, d, k, bias=True, device=x.device)
        if conv:
            eqs.update_patches(x, layer, y.reshape(y.shape[0], 1, k, -1))
        else:
            eqs.update(x.reshape(1, -1, d), y.reshape(1, -1, k))
    eqs.all_reduce()
    return eqs
