"""Samples: take N unlabelled inputs (one tensor or several) from whatever a loader yields."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fxkd.errors import DataError, EmptyLoaderError
from fxkd.inputs import Inputs, bind_batch

__all__ = ["first_tensor", "take_inputs", "take_samples"]

log = logging.getLogger(__name__)


def first_tensor(batch: Any, key: str | None = None) -> torch.Tensor:
    """The input tensor of one batch: the batch itself, its first element, or ``batch[key]``."""
    inputs = bind_batch(batch, key)
    if inputs.single is None:  # pragma: no cover - bind_batch without a model binds one input
        raise DataError(f"the batch holds several inputs: {inputs.describe()}")
    return inputs.single


def take_inputs(
    loader: Iterable[Any] | torch.Tensor | Inputs,
    num_samples: int,
    *,
    key: str | None = None,
    seed: int = 0,
    model: Callable[..., Any] | None = None,
) -> Inputs:
    """The first ``num_samples`` samples the loader yields, as :class:`~fxkd.inputs.Inputs`.

    Each batch is bound to ``model``'s ``forward`` by :func:`~fxkd.inputs.bind_batch`: a tensor,
    a dict of keyword inputs (``input_ids`` + ``attention_mask``), a tuple of positional ones;
    labels are dropped. ``num_samples`` counts samples (rows along dim 0), whatever the number
    of inputs. torch's RNG is seeded while the loader is iterated, so shuffling loaders give the
    same samples every run; the global RNG state is restored afterwards. Fewer samples than
    asked: a warning, and the ones there are. None: EmptyLoaderError.
    """
    if isinstance(loader, (torch.Tensor, Inputs)):
        batches: Iterable[Any] = [loader]
    else:
        batches = loader
    taken: list[Inputs] = []
    count = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in batches:
            inputs = bind_batch(batch, key, model)
            if taken:  # structure and per-sample shapes checked as they come
                taken[0].check_matches(inputs)
            taken.append(inputs[: num_samples - count].detach())
            count += len(taken[-1])
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
            stacklevel=3,
        )
    return Inputs.cat(taken)


def take_samples(
    loader: Iterable[Any] | torch.Tensor,
    num_samples: int,
    *,
    key: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """``take_inputs`` for a model with one tensor input: the samples as one tensor."""
    inputs = take_inputs(loader, num_samples, key=key, seed=seed)
    assert inputs.single is not None  # bind_batch without a model binds one input
    return inputs.single
