"""Streaming normal equations for batched linear least squares.

P independent systems (one per group of a grouped producer) share the row stream::

    W_p* = argmin_W  Σ_rows || x_p W + 1·c_p − y_p ||²      x_p: (rows, D), y_p: (rows, K)

``update`` accumulates ``G = [x 1]ᵀ[x 1]`` and ``B = [x 1]ᵀ y`` chunk by chunk (fp32 products
of chunk-centred data on the chunk's device, mean terms and sums in fp64). ``solve`` returns the
ridge solution shrunk towards a prior ``W0`` (the student as it is):

    (G + λ·I_D) W = B + λ·W0,   λ = α · mean(diag G[:D, :D])      (no ridge on the bias row)

by Cholesky in fp64, falling back to an eigendecomposition pseudo-inverse for systems Cholesky
rejects. The sums are over rows, so data-parallel calibration is one ``all_reduce`` per solve.

``conditioning`` diagnoses the features before the ridge: with the (centred, when there is a
bias) second moments ``S`` and their correlation ``R = D^-1/2 S D^-1/2``, a feature is *dead*
when its variance is zero, and the number of *dependent* features is the number of R's
eigenvalues below fp32 precision (its numerical rank deficiency: the same count whichever order
the features come in, and what the narrow-side diagnosis of ``fxkd.solve.narrow`` reads). One
Cholesky of R settles the usual case: when every pivot (the share of a feature's variance that
earlier features do not explain) is above that precision, no feature is counted dependent and

    cond(R) ≥ 1 / min pivot

(every Schur-complement pivot is at least λ_min(R), and λ_max(R) ≥ 1), a lower bound that costs
one Cholesky instead of an eigendecomposition. A pivot below it (or a failed factorization)
means some eigenvalue is: the eigenvalues below it are then counted by inertia (``_diagnose``).
Counting pivots instead would count a near-duplicate *and* every feature it then "explains"
(x₁ = x₀ + 10⁻⁴x₂ made x₂'s pivot zero: 2 dependent for one null direction), or not, as the
rounding of that zero pivot made the factorization succeed or fail on a given CPU.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fxkd.solve.displaced import DisplacedProducts, displaced_products_pay
from fxkd.solve.narrow import BlockAffine, correlation_spectra, live_features, narrow_solve
from fxkd.solve.patches import centred_patch_rows, patch_mask, summed_patches

__all__ = ["Conditioning", "NormalEquations", "all_reduce_sum"]

log = logging.getLogger(__name__)


DEPENDENT_PIVOT = 1e-7
"""A feature whose unexplained share of variance is below this is numerically dependent (fp32
features carry about 7 significant digits)."""

SYMMETRIC_PANELS_FROM = 128
"""Features from which the Gram product skips its upper block triangle."""

ILL_CONDITIONED = 1e6
"""Condition bound above which the unridged solution is dominated by fp32 rounding noise."""


@dataclass(frozen=True)
class Conditioning:
    """How well the features determine the solution, summed over the P systems.

    features: P·D; dead: zero-variance features; dependent: the live features' correlation
    eigenvalues below ``DEPENDENT_PIVOT`` (duplicated channels, fewer rows than features);
    rank = features − dead − dependent; condition: a lower bound of the live features'
    correlation condition number (worst system)."""

    features: int
    dead: int
    dependent: int
    condition: float

    @classmethod
    def combine(cls, parts: list[Conditioning]) -> Conditioning:
        """The diagnosis of several systems solved for one point, taken together."""
        return cls(
            sum(c.features for c in parts),
            sum(c.dead for c in parts),
            sum(c.dependent for c in parts),
            max(c.condition for c in parts),
        )

    @property
    def rank(self) -> int:
        return self.features - self.dead - self.dependent

    @property
    def ill(self) -> bool:
        """True when the ridge, not the samples, decides some directions of the solution."""
        return bool(self.dead or self.dependent or self.condition > ILL_CONDITIONED)

    def __str__(self) -> str:
        bound = "singular" if self.condition == float("inf") else f">= {self.condition:.1e}"
        return (
            f"rank {self.rank}/{self.features} ({self.dead} dead, {self.dependent} dependent), "
            f"condition {bound}"
        )


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

    Per update only the fp32 products ``x_cᵀx_c`` (its lower block triangle, ``_panels``) and
    ``x_cᵀy_c`` (accumulated in place, flushed to fp64 every ``FLUSH_ROWS`` rows) and the small
    sums are taken; the D×D shift terms are added once, in fp64, when ``gram`` / ``cross`` are
    read (they are linear in the sums: μ, ν stay fixed after the first update). Rounding thus
    scales with the features' spread, not their mean (BatchNorm/ReLU features have large
    means)."""

    FLUSH_ROWS = 1 << 17
    """fp32 product rows accumulated before they are added to the fp64 sums (about one GEMM's
    own summation length)."""

    SMALL_FEATURES = 12
    """Systems with fewer features than this take their products over chains of ``CHAIN``
    rows (``_chained_products``). CPU BLAS sums an fp32 product with under 12 output rows over
    the inner dimension in one long chain (MKL's small-matrix kernels, measured with torch
    2.14: the Gram of 8 ReLU features over 65,536 rows 2e-5 off, 65 times the 3e-7 of 12 or
    more features): an 8-channel pointwise site, a 1-channel 3×3 stem (9 patch features)."""

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
        self._xx: torch.Tensor | None = None  # flushed x_cᵀx_c, fp64, lower block triangle
        self._xy: torch.Tensor | None = None  # flushed x_cᵀy_c, fp64
        self._acc: tuple[torch.Tensor, torch.Tensor] | None = None  # fp32 products, unflushed
        self._acc_rows = 0
        self._stats: dict[str, torch.Tensor] = {}  # s_x, s_y (and S, T for patches), fp64
        self._pending_rows = 0  # rows in _stats (since the sums were last reduced over ranks)
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None  # μ (P, D), ν (P, K)
        self._mask: torch.Tensor | None = None  # m (L, nk) of update_patches; None: uniform
        self._producer = None  # update_patches' conv: its patches of the summed inputs give S
        self._displaced: DisplacedProducts | None = None  # update_patches' stride-1 products
        self._final: tuple[torch.Tensor, torch.Tensor] | None = None
        self._narrow: tuple[BlockAffine, torch.Tensor, torch.Tensor] | None = None  # M, G_h, B_h
        self.rows = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows given row-major: ``x`` (P, rows, D), ``y`` (P, rows, K)."""
        self.update_blocks(x.transpose(-1, -2)[None], y.transpose(-1, -2)[None])

    def update_blocks(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows given feature-major, as layers hold them: ``x`` (B, P, D, L) and ``y``
        (B, P, K, L), rows = B·L (e.g. a conv output (N, C, H, W) viewed as (N, G, C/G, H·W):
        no copy). Any float dtype. The shift is written straight into a (P, D, rows) buffer,
        so shifting is also the one copy that puts the rows in GEMM layout."""
        self._check_open()
        dtype = _work_dtype(x)
        if self._shift is None:  # fp32-rounded shifts: the algebra is exact for any shift
            self._set_shift(x.to(dtype).mean(dim=(0, 3)), y, dtype)
        self._add(_shifted(x, self._shift[0].to(x.device)[:, None, :], dtype), y)

    def update_patches(self, x: torch.Tensor, producer, y: torch.Tensor) -> None:
        """Add the rows of a conv ``producer``'s input ``x`` (B, C, *S) as its im2col patches
        (what its kernel multiplies; features per group ordered like ``weight[o].flatten()``),
        against ``y`` (B, P, K, L), P = the conv's groups. The patches are built once, already
        centred and in GEMM layout (``centred_patch_rows``): no separate shift pass over the
        k²-times larger patch matrix."""
        self._check_open()
        dtype = _work_dtype(x)
        g, c = producer.groups, x.shape[1]
        taps = math.prod(producer.kernel_size)
        if self._shift is None:
            mu_c = x.to(dtype).mean(dim=(0, *range(2, x.dim())))
            mu = mu_c.view(g, c // g, 1).expand(g, c // g, taps).reshape(g, -1)
            self._set_shift(mu, y, dtype)
        mu_c = self._shift[0].view(g, c // g, taps)[:, :, 0].reshape(-1).to(x.device, dtype)
        if self._displaced is not None or (
            self._mask is None and displaced_products_pay(producer, x)
        ):  # decided at the first update: the producer and the input's shape stay the same
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
            self._mask = patch_mask(producer, spatial, x.device)
            self._producer = producer
        x_total, y_sum = self._displaced.add(x, mu_c, y, self._shift[1])
        self._count(x_total, y_sum, b * length)
        if self._displaced.rows >= self.FLUSH_ROWS:
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
        d = xc.shape[1]
        nu = self._shift[1].to(y.device)
        yc = _shifted(y, nu[:, None, :], xc.dtype)  # (P, K, rows)
        if self._acc is None or self._acc[0].dtype != xc.dtype:
            self._flush()
            self._acc = (
                torch.zeros(p, d, d, dtype=xc.dtype, device=xc.device),
                torch.zeros(p, d, k, dtype=xc.dtype, device=xc.device),
            )
        if d < self.SMALL_FEATURES and xc.dtype == torch.float32:
            gram, cross = _chained_products(xc, yc)
            self._acc[0].add_(gram)
            self._acc[1].add_(cross)
        else:
            for lo, hi in self._panels:  # lower block triangle only; the rest its transpose
                self._acc[0][:, lo:hi, :hi].baddbmm_(xc[:, lo:hi], xc[:, :hi].transpose(-1, -2))
            self._acc[1].baddbmm_(xc, yc.transpose(-1, -2))
        self._acc_rows += b * length
        if x_total is None:
            self._count(xc.sum(dim=-1).double(), yc.sum(dim=-1).double(), b * length)
        else:
            self._count(x_total, yc.view(p, k, b, length).sum(dim=2).double(), b * length)
        if self._acc_rows >= self.FLUSH_ROWS:
            self._flush()

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

    @property
    def _panels(self) -> list[tuple[int, int]]:
        """Row panels of the Gram product: panel [lo, hi) of x_cᵀx_c is taken against the
        features before hi only, which skips the upper block triangle (symmetric): 4 panels
        take 5/8 of the FLOPs, 0.66-0.84x the time of the full product at D = 288-2304 on a
        2-core CPU. One panel (the full product) below ``SYMMETRIC_PANELS_FROM`` features."""
        d = self.features
        n = 4 if d >= SYMMETRIC_PANELS_FROM else 1
        edges = [round(i * d / n) for i in range(n + 1)]
        return list(itertools.pairwise(edges))

    def _flush(self) -> None:
        """Add the fp32 products to the fp64 sums (the Gram's skipped upper triangle stays
        zero: ``_finalize`` fills it; displaced products are assembled there)."""
        if self._displaced is not None:
            self._displaced.flush()
        if self._acc is not None and self._acc_rows:
            if self._xx is None:
                self._xx, self._xy = (a.to(torch.float64, copy=True) for a in self._acc)
            else:  # added in place, promoted to fp64 on the fly: no D×D temporary
                self._xx.add_(self._acc[0])
                self._xy.add_(self._acc[1])
            self._acc[0].zero_()
            self._acc[1].zero_()
        self._acc_rows = 0

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
            if self._xx is not None:  # one pass: a copy, not zeros plus a sum
                features.copy_(self._xx)
                targets.copy_(self._xy)
            else:
                features.zero_()
                targets.zero_()
        else:
            gram, cross = (t.clone() for t in self._base)
            features, targets = gram[:, :d, :d], cross[:, :d]
            if self._xx is not None:
                features += self._xx
                targets += self._xy
        displaced = self._displaced.totals() if self._displaced is not None else None
        if displaced is not None:  # the full Gram, not a block triangle: mirroring keeps it
            features += displaced[0]
            targets += displaced[1]
        for lo, hi in self._panels[:-1]:  # the upper triangle the panels skipped
            features[:, lo:hi, hi:] = features[:, hi:, lo:hi].transpose(-1, -2)
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
        self._base = (all_reduce_sum(gram), all_reduce_sum(cross))
        self.rows = int(all_reduce_sum(rows).item())
        self._xx = self._xy = None
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
        self._xx = self._xy = self._acc = self._displaced = self._shift = None
        self._stats, self._pending_rows, self._acc_rows, self._mask = {}, 0, 0, None

    def conditioning(self) -> Conditioning:
        """Dead and dependent features and a condition bound of the accumulated features. With
        fewer (centred) rows than live features a system is singular without a factorization:
        the features past the row count are counted dependent (a lower bound)."""
        if self._narrow is not None:
            return self._narrow_conditioning()
        d, n = self.features, max(self.rows, 1)
        gram = self.gram
        second = torch.diagonal(gram[:, :d, :d], dim1=-2, dim2=-1) / n
        mean = gram[:, d, :d] / n if self.bias else torch.zeros_like(second)
        # centred moments: a constant feature is collinear with the bias
        var = (second - mean * mean).clamp_min(0)
        live = live_features(var)
        dead = int((~live).sum())
        if dead == 0:  # the usual case: every system at once
            systems = [(gram[:, :d, :d], mean, var)]
        else:
            systems = [
                (gram[p][idx[:, None], idx][None], mean[p, idx][None], var[p, idx][None])
                for p, idx in ((p, live[p].nonzero().squeeze(1)) for p in range(len(var)))
                if idx.numel()
            ]
        dependent, condition = 0, 1.0
        most = self.rows - int(self.bias)  # the centred rows span at most this many features
        for second_moments, m, v in systems:
            live_here = second_moments.shape[-1]
            if live_here > most:  # fewer rows than features: singular without factorizing
                # (these fell back to eigvalsh: 2.8 s of resnet50 64x64 N=256 on a 2-core CPU)
                dependent += second_moments.shape[0] * (live_here - max(most, 0))
                condition = float("inf")
                continue
            below, smallest = _diagnose(_correlation(second_moments, m, v, n))
            dependent += below
            condition = max(condition, 1.0 / smallest if smallest > 0 else float("inf"))
        return Conditioning(var.shape[0] * d, dead, dependent, condition)

    def _narrow_conditioning(self) -> Conditioning:
        """``conditioning`` of projected sums from the D×D spectra (``fxkd.solve.narrow``): the live
        features' correlation has those eigenvalues and L − D zeros; dependent: its eigenvalues
        below ``DEPENDENT_PIVOT``, condition: its largest over its smallest (the exact
        condition number, so again a lower bound)."""
        affine, gram, _ = self._narrow
        live, spectra = correlation_spectra(gram, affine)
        dependent, condition = 0, 1.0
        for count, eig in zip(live.sum(dim=-1).tolist(), spectra, strict=True):
            if not count:  # every feature of this system is dead
                continue
            if count > eig.shape[0]:
                eig = torch.cat([eig.new_zeros(count - eig.shape[0]), eig])
            eig = eig[-count:]  # ascending: the live correlation's whole spectrum
            dependent += int((eig < DEPENDENT_PIVOT).sum())
            smallest = float(eig[0])
            condition = max(condition, float(eig[-1]) / smallest if smallest > 0 else math.inf)
        return Conditioning(live.numel(), int((~live).sum()), dependent, condition)

    def solve(self, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
        """The (P, D[+1], K) solution; ``prior`` (same shape) is what the ridge shrinks towards."""
        if self._narrow is not None:  # projected: solved at the narrow side when it can be
            affine, gram, cross = self._narrow
            w, ok = narrow_solve(gram, cross, affine, ridge, prior)
            if ok:
                return w
            log.debug("narrow-side solve failed: solving the mapped system")
        g, b = self.gram, self.cross
        d = self.features
        diag = torch.diagonal(g[:, :d, :d], dim1=-2, dim2=-1)
        lam = ridge * diag.mean(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
        a = g.clone()  # G + λ·I_D: the ridge on the feature diagonal, none on the bias
        torch.diagonal(a, dim1=-2, dim2=-1)[:, :d] += lam[:, None]
        rhs = b
        if prior is not None:  # + λ·I_D W0: the prior's feature rows (an elementwise product,
            shrink = prior.to(b).clone()  # not a D³ product with an identity matrix)
            shrink[:, d:] = 0
            rhs = b + lam[:, None, None] * shrink
        chol, info = torch.linalg.cholesky_ex(a)  # two triangular solves: cholesky_solve's
        w = torch.linalg.solve_triangular(chol, rhs, upper=False)  # own copies made it 1.3-1.7x
        w = torch.linalg.solve_triangular(chol.mT, w, upper=True)  # slower (same result)
        bad = (info != 0) | ~torch.isfinite(w).flatten(1).all(dim=1)
        if bad.any():
            log.warning(
                "Cholesky failed for %d of %d systems; using a pseudo-inverse",
                int(bad.sum()),
                len(bad),
            )
            w[bad] = _pinv_solve(a[bad], rhs[bad])
        return w


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


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMMs' dtype: fp64 for fp64 data, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


CHAIN = 256
"""Rows per partial product of a small system (``_chained_products``)."""


def _chained_products(xc: torch.Tensor, yc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``xc xcᵀ`` (P, D, D) and ``xc ycᵀ`` (P, D, K) of rows ``xc`` (P, D, R), ``yc`` (P, K, R)
    as one batched product per ``CHAIN`` rows, the partial products then summed (a cascade):
    each fp32 chain is at most ``CHAIN`` long whatever kernel the BLAS picks. 8 features over
    65,536 rows: Gram 1.6e-7 off (one product: 1.9e-5), 1.4× its time on a 2-core CPU."""
    p, d, rows = xc.shape
    whole = rows - rows % CHAIN
    xb = xc[..., :whole].view(p, d, -1, CHAIN).transpose(1, 2)  # (P, B, D, CHAIN)
    yb = yc[..., :whole].view(p, yc.shape[1], -1, CHAIN).transpose(1, 2)
    gram = torch.matmul(xb, xb.transpose(-1, -2)).sum(dim=1)
    cross = torch.matmul(xb, yb.transpose(-1, -2)).sum(dim=1)
    if whole < rows:  # the last, shorter chain
        tail = xc[..., whole:]
        gram.baddbmm_(tail, tail.transpose(-1, -2))
        cross.baddbmm_(tail, yc[..., whole:].transpose(-1, -2))
    return gram, cross


def _shifted(v: torch.Tensor, shift64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` (B, P, F, L) minus ``shift`` (P, 1, F), as a contiguous (P, F, B·L) tensor: one
    pass that shifts and lays the rows out for the GEMM."""
    b, p, f, length = v.shape
    out = torch.empty(p, f, b, length, dtype=dtype, device=v.device)
    shift = shift64.to(dtype).transpose(-1, -2)[None]  # (1, P, F, 1)
    torch.sub(v.to(dtype), shift, out=out.permute(2, 0, 1, 3))
    return out.view(p, f, b * length)


def _correlation(
    second_moments: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, rows: int
) -> torch.Tensor:
    """Correlation matrices ``diag(σ)⁻¹ (G/n − μμᵀ) diag(σ)⁻¹`` of (P, D, D) uncentred sums
    ``G`` over ``n`` rows with means μ and variances σ² (P, D), as one new tensor in three
    passes (no D×D temporaries: these run once per solve on up to 4,608 features)."""
    corr = torch.baddbmm(second_moments, mean[:, :, None], mean[:, None, :], beta=1.0 / rows,
                         alpha=-1.0)  # fmt: skip
    sd = var.rsqrt()
    return corr.mul_(sd[:, :, None]).mul_(sd[:, None, :])


def _diagnose(corr: torch.Tensor) -> tuple[int, float]:
    """(eigenvalues below ``DEPENDENT_PIVOT``, smallest pivot or eigenvalue) of correlation
    matrices (unit diagonal; overwritten). First the pivots ``L_ii²`` of a Cholesky factor (a
    tiny jitter keeps exactly singular matrices factorable; their pivots come out at the
    jitter): when none is below ``DEPENDENT_PIVOT`` neither is any eigenvalue's count to
    report, and the smallest pivot bounds λ_min from above. Otherwise (a pivot below it, or a
    matrix indefinite beyond the jitter from rounding in the centred moments) the count is
    the number of eigenvalues below ``DEPENDENT_PIVOT``, read without an eigensolver: by
    Sylvester's law of inertia it is the number of negative eigenvalues of ``D`` in a Bunch–Kaufman
    ``LDLᵀ = corr − DEPENDENT_PIVOT·I``, where each 2×2 block of ``D`` has exactly one (its
    determinant is negative) and each 1×1 block its sign; the smallest reported is the
    smallest pivot, or 0 (condition ∞) when the factorization failed. Same counts as
    ``eigvalsh`` (tested), 2–5× faster on a CPU (resnet50 64×64 N=256 pointwise, 2 cores:
    0.85 s → 0.25 s); on a GPU ``eigvalsh`` stays
    (H200, resnet50 224×224 N=256: cuSOLVER's LDLᵀ 0.77–0.81 s for the 16 fallbacks where
    eigvalsh took 0.25 s)."""
    jitter = corr.shape[-1] * torch.finfo(torch.float64).eps
    diagonal = torch.diagonal(corr, dim1=-2, dim2=-1)
    diagonal += jitter
    chol, info = torch.linalg.cholesky_ex(corr)
    smallest = 0.0
    if not bool((info != 0).any()):
        pivots = torch.diagonal(chol, dim1=-2, dim2=-1).square()
        smallest = float(pivots.min())
        if smallest >= DEPENDENT_PIVOT:
            return 0, smallest
    diagonal -= jitter
    if corr.device.type == "cuda":  # cuSOLVER's LDLᵀ is 3× slower than its eigvalsh (H200)
        eig = torch.linalg.eigvalsh(corr).clamp_min(0)
        return int((eig < DEPENDENT_PIVOT).sum()), float(eig.min())
    return _count_below(corr, DEPENDENT_PIVOT), smallest


def _count_below(sym: torch.Tensor, tau: float) -> int:
    """How many eigenvalues of the symmetric matrices ``sym`` (overwritten) lie below ``tau``
    (inertia of a Bunch–Kaufman LDLᵀ of ``sym − τI``; LAPACK's pivots: > 0 a 1×1 block, a
    negative pair a 2×2 block)."""
    torch.diagonal(sym, dim1=-2, dim2=-1).sub_(tau)
    ld, pivots, _ = torch.linalg.ldl_factor_ex(sym)
    diag = torch.diagonal(ld, dim1=-2, dim2=-1)
    return int(((pivots > 0) & (diag < 0)).sum() + (pivots < 0).sum() // 2)


def _pinv_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Minimum-norm solution of symmetric PSD systems through eigh, small eigenvalues cut."""
    vals, vecs = torch.linalg.eigh(a)
    cut = vals.amax(dim=-1, keepdim=True) * a.shape[-1] * torch.finfo(a.dtype).eps
    inv = torch.where(vals > cut, 1.0 / vals.clamp_min(torch.finfo(a.dtype).tiny), 0.0)
    return vecs @ (inv[..., None] * (vecs.transpose(-1, -2) @ rhs))
