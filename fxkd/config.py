"""CompressConfig: every option of ``fxkd.compress`` in one frozen dataclass, documented once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fxkd.capture import CAPTURE_METHODS
from fxkd.errors import ConfigError

__all__ = ["DEFAULT_RIDGE", "MODES", "CompressConfig"]

MODES = ("pointwise", "kernel")
DEFAULT_RIDGE = {"pointwise": 1e-4, "kernel": 1e-2}
GRANULARITIES = ("layer", "block")


@dataclass(frozen=True)
class CompressConfig:
    """Options of a compression run. Pass it whole (``config=``) or field by field as keywords.

    Attributes:
        num_samples: how many unlabelled samples to take from the loader (the few in few-sample).
        mode: ``"kernel"`` solves each site's whole producer kernel on its input patches (default:
            the better fit, see the README's benchmark); ``"pointwise"`` solves the paper's 1x1
            adapter ``Q`` on the producer's output.
        ridge: relative ridge ``α``; the solve uses ``λ = α·mean(diag G)`` and shrinks towards the
            student's current weights (identity ``Q``, or the present kernel), not towards zero,
            so a system with fewer samples than unknowns stays close to the student as given.
            ``None`` (default) picks the mode's default (``DEFAULT_RIDGE``), chosen by a sweep
            on a held-out slice of Fashion-MNIST's training split (README, "Ridge").
            ``"cv"``: chosen per solve by 4-fold cross-validation over the samples
            (``fxkd.solve.crossval``; the rows of one sample stay in one fold), from
            ``CANDIDATES``; projected systems, and fewer than 8 samples, take the default.
        granularity: ``"layer"`` puts a site at every aligned affine producer; ``"block"`` keeps
            only the sites whose matched point is a block boundary (a cut of the graph).
        chunk_size: samples per forward chunk during calibration.
        device: where calibration runs (``"cpu"``, ``"cuda"``, ...); default: the student's device.
        channel_maps: for pruned students, ``{student producer module name: kept teacher output
            channels}``; the teacher target at that site is restricted to those channels.
        capture: how the models become graphs (``fxkd.capture``): ``"fx"`` (symbolic tracing),
            ``"export"`` (``torch.export``, non-strict), or ``"auto"`` (default: symbolic
            tracing, ``torch.export`` for both models when either cannot be traced). The report
            says which one ran.
        leaf_modules: extra module types that torch.fx must not trace into.
        input_key: for loaders that yield dicts holding one input and labels, the key of the
            input tensor. Without it, a dict's entries named like ``forward``'s parameters
            (``input_ids``, ``attention_mask``, ...) are passed as keyword inputs.
        seed: seeds torch's RNG while samples are drawn (shuffling loaders become reproducible).
        fold_batchnorm: also fuse every eval BatchNorm into its conv/linear after folding adapters
            (deployment form; changes parameter shapes, so off by default).
        offload: keep the activations held between blocks in CPU memory (pinned) and bring
            one chunk at a time to the GPU: device memory becomes one chunk's working set,
            whatever ``num_samples``; costs host-device copies. No effect on CPU.
        subsample: share of each conv site's spatial positions (per sample, drawn at random
            with ``seed``) that enter the normal equations, in (0, 1]. Cuts the Gram's work and
            its per-chunk buffers by that share; fully-connected sites keep all rows. The
            errors in the report are still measured on every position.
        memory_limit: bytes calibration may use on its device (and in CPU memory when
            offloading); default: what the device reports free. A calibration whose estimate
            (``fxkd.passes.memory.estimate``) exceeds it stops before any work, with the options
            that would make it fit.
        relax_rounds: rounds of targets relaxed through the nonlinearity that reads a point
            (``fxkd.solve.relax``): where only a ReLU (ReLU6, hardtanh) reads the point, rows
            the teacher clamps need the student clamped too, not equal; each round re-solves
            the same least squares against the closest such targets, which can only lower the
            error after the nonlinearity's bound. Errors at such points are reported after the
            nonlinearity. 0: plain least squares on the pre-activation (the paper's).
        select_channels: in kernel mode, choose from the samples which teacher channels a
            pruned student's *internal* channels imitate (``fxkd.passes.select``: the channels
            of a producer read by one consumer only, picked greedily so that the consumer's
            teacher output is best reconstructed from them), instead of the pruner's choice.
            Shapes and the student are unchanged; only the calibration targets move. ``False``:
            keep the channel maps as given or built.
        polish_steps: after the closed form, this many steps of the label-free gradient polish
            (``fxkd.polish``: Adam on the teacher-normalised squared error at every aligned
            point, BatchNorm frozen; shapes unchanged). 0 (default): closed form only. The
            report's errors are the closed form's.
        polish_lr: the polish's learning rate.
        progress: show tqdm progress bars.
        onnx_atol, onnx_rtol: tolerances of the onnxruntime parity check.
    """

    num_samples: int = 256
    mode: str = "kernel"
    ridge: float | str | None = None
    granularity: str = "layer"
    chunk_size: int = 64
    device: str | None = None
    channel_maps: Mapping[str, Sequence[int]] = field(default_factory=dict)
    capture: str = "auto"
    leaf_modules: tuple[type, ...] = ()
    input_key: str | None = None
    seed: int = 0
    fold_batchnorm: bool = False
    offload: bool = False
    subsample: float = 1.0
    memory_limit: int | None = None
    relax_rounds: int = 3
    select_channels: bool = True
    polish_steps: int = 0
    polish_lr: float = 1e-3
    progress: bool = True
    onnx_atol: float = 1e-4
    onnx_rtol: float = 1e-3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r} is not one of {GRANULARITIES}")
        if self.capture not in CAPTURE_METHODS:
            raise ConfigError(f"capture={self.capture!r} is not one of {CAPTURE_METHODS}")
        if not (isinstance(self.num_samples, int) and self.num_samples > 0):
            raise ConfigError(f"num_samples={self.num_samples!r} must be a positive int")
        if not (isinstance(self.chunk_size, int) and self.chunk_size > 0):
            raise ConfigError(f"chunk_size={self.chunk_size!r} must be a positive int")
        if not (isinstance(self.subsample, (int, float)) and 0.0 < self.subsample <= 1.0):
            raise ConfigError(
                f"subsample={self.subsample!r} must be a share of positions in (0, 1], e.g. 0.25"
            )
        if self.memory_limit is not None and not (
            isinstance(self.memory_limit, int) and self.memory_limit > 0
        ):
            raise ConfigError(f"memory_limit={self.memory_limit!r} must be a positive byte count")
        if not (isinstance(self.relax_rounds, int) and self.relax_rounds >= 0):
            raise ConfigError(f"relax_rounds={self.relax_rounds!r} must be an int >= 0")
        if not (isinstance(self.polish_steps, int) and self.polish_steps >= 0):
            raise ConfigError(f"polish_steps={self.polish_steps!r} must be an int >= 0")
        if not self.polish_lr > 0:
            raise ConfigError(f"polish_lr={self.polish_lr!r} must be > 0")
        if (
            self.ridge is not None
            and self.ridge != "cv"
            and not (isinstance(self.ridge, (int, float)) and self.ridge >= 0)
        ):
            raise ConfigError(
                f"ridge={self.ridge!r} must be >= 0 (a relative ridge, e.g. 1e-4) or 'cv'"
            )
        for name, channels in self.channel_maps.items():
            if len(set(channels)) != len(channels) or any(int(c) < 0 for c in channels):
                raise ConfigError(
                    f"channel_maps[{name!r}] must list distinct non-negative teacher channels"
                )

    @property
    def effective_ridge(self) -> float | str:
        """The ridge in force: ``ridge`` (a number or ``"cv"``), or the mode's default."""
        return DEFAULT_RIDGE[self.mode] if self.ridge is None else self.ridge

    @property
    def fixed_ridge(self) -> float:
        """The number a solve uses without cross-validation: ``ridge``, or the mode's default
        when it is None or ``"cv"``."""
        ridge = self.effective_ridge
        return DEFAULT_RIDGE[self.mode] if ridge == "cv" else ridge

    def replace(self, **overrides: Any) -> CompressConfig:
        """A copy with some fields changed; an unknown field raises ConfigError naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown}; CompressConfig fields are {sorted(known)}"
            )
        return dataclasses.replace(self, **overrides)
