"""Samples: take N unlabelled inputs from whatever a loader yields."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from fxkd.errors import DataError, EmptyLoaderError

__all__ = ["first_tensor", "take_samples"]

log = logging.getLogger(__name__)


def first_tensor(batch: Any, key: str | None = None) -> torch.Tensor:
    """The input tensor of one batch: the batch itself, its first element, or ``batch[key]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        if key is None:
            key = next(iter(batch), None)
        if key not in batch:
            raise DataError(
                f"the loader yields dicts with keys {sorted(batch)}, and input_key={key!r} is not "
                "one of them. Hint: pass input_key= naming the input tensor's key."
            )
        value = batch[key]
    elif isinstance(batch, (tuple, list)) and batch:
        value = batch[0]
    else:
        value = batch
    if not isinstance(value, torch.Tensor):
        raise DataError(
            f"the loader yields {type(value).__name__}, not a tensor (batch type "
            f"{type(batch).__name__}). Hint: yield tensors, (tensor, label) pairs, or dicts with "
            "input_key naming the tensor."
        )
    return value


def take_samples(
    loader: Iterable[Any] | torch.Tensor,
    num_samples: int,
    *,
    key: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The first ``num_samples`` inputs the loader yields, as one tensor (labels are dropped).

    ``loader`` may be a tensor of samples, or any iterable of batches (DataLoader, list, ...).
    torch's RNG is seeded while it is iterated, so shuffling loaders give the same samples every
    run; the global RNG state is restored afterwards. Fewer samples than asked: a warning, and
    the ones there are. None: EmptyLoaderError.
    """
    if isinstance(loader, torch.Tensor):
        batches: Iterable[Any] = [loader]
    else:
        batches = loader
    taken: list[torch.Tensor] = []
    count = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in batches:
            x = first_tensor(batch, key)
            if x.dim() == 0:
                raise DataError("the loader yields 0-d tensors; expected a batch dimension first")
            if taken and x.shape[1:] != taken[0].shape[1:]:
                raise DataError(
                    f"batch shapes disagree: {tuple(taken[0].shape[1:])} then "
                    f"{tuple(x.shape[1:])} (per sample). Hint: resize inputs to one shape."
                )
            taken.append(x[: num_samples - count].detach())
            count += taken[-1].shape[0]
            if count >= num_samples:
                break
    if count == 0:
        raise EmptyLoaderError(
            "the loader yielded no samples. Hint: check the dataset path/filters; fxkd needs a "
            "few hundred unlabelled inputs."
        )
    if count < num_samples:
        warnings.warn(
            f"asked for num_samples={num_samples} but the loader yielded {count}; using {count}",
            stacklevel=2,
        )
    return torch.cat(taken)
