"""Model inputs: N samples of what a model's ``forward`` takes.

An :class:`Inputs` holds positional and keyword tensors, every one with the samples along dim 0:
one image tensor, or ``input_ids`` + ``attention_mask``, or any mix. Integer inputs (token ids,
masks) keep their dtype when the floating ones are cast to a model's dtype. A graph runs them
through its placeholders: in ``forward``'s order for a symbolically traced graph, flattened by
the graph's input spec for a ``torch.export`` one (:meth:`Inputs.placeholder_values`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx._pytree import tree_flatten_spec

from fxkd.errors import DataError

__all__ = ["Inputs", "bind_batch", "forward_parameters", "moved"]


@dataclass(frozen=True)
class Inputs:
    """Positional ``args`` and keyword ``kwargs`` tensors, the samples along dim 0 of each."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        leaves = self.leaves()
        if not leaves:
            raise DataError("a batch holds no input tensor. Hint: yield tensors or dicts of them.")
        for name, t in self.named_leaves():
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                raise DataError(
                    f"input {name} is {type(t).__name__}"
                    + (" with no batch dimension" if isinstance(t, torch.Tensor) else "")
                    + ". Hint: every input must be a tensor with the samples along dim 0."
                )
        sizes = {t.shape[0] for t in leaves}
        if len(sizes) != 1:
            raise DataError(
                f"the inputs hold different numbers of samples: {self.describe()}. Hint: every "
                "input tensor of a batch must have the samples along dim 0."
            )

    @classmethod
    def of(cls, value: Inputs | torch.Tensor) -> Inputs:
        """``value`` itself, or a single tensor as the one positional input."""
        if isinstance(value, Inputs):
            return value
        if isinstance(value, torch.Tensor):
            return cls((value,))
        raise DataError(f"expected a tensor or Inputs, got {type(value).__name__}")

    @classmethod
    def example(cls, value: Any) -> Inputs:
        """A user's example batch as Inputs: a tensor (the one input), a tuple or list
        (positional inputs), a dict (keyword inputs), or Inputs."""
        if isinstance(value, (tuple, list)):
            return cls(tuple(value))
        if isinstance(value, dict):
            return cls((), dict(value))
        return cls.of(value)

    @classmethod
    def cat(cls, parts: list[Inputs]) -> Inputs:
        """The samples of ``parts`` one after the other (all of one structure)."""
        first = parts[0]
        for p in parts[1:]:
            first.check_matches(p)
        args = tuple(torch.cat([p.args[i] for p in parts]) for i in range(len(first.args)))
        kwargs = {k: torch.cat([p.kwargs[k] for p in parts]) for k in first.kwargs}
        return cls(args, kwargs)

    def check_matches(self, other: Inputs) -> None:
        """DataError unless ``other`` holds the same inputs with the same per-sample shapes."""
        if len(other.args) != len(self.args) or other.kwargs.keys() != self.kwargs.keys():
            raise DataError(
                f"batches disagree in structure: {self.describe()} then {other.describe()}. "
                "Hint: every batch must hold the same inputs."
            )
        for (name, a), (_, b) in zip(self.named_leaves(), other.named_leaves(), strict=True):
            if a.shape[1:] != b.shape[1:]:
                raise DataError(
                    f"batch shapes disagree at input {name}: {tuple(a.shape[1:])} then "
                    f"{tuple(b.shape[1:])} (per sample). Hint: resize or pad inputs to one shape."
                )

    def leaves(self) -> list[torch.Tensor]:
        return [*self.args, *self.kwargs.values()]

    def named_leaves(self) -> list[tuple[str, torch.Tensor]]:
        return [(f"#{i}", a) for i, a in enumerate(self.args)] + list(self.kwargs.items())

    @property
    def single(self) -> torch.Tensor | None:
        """The tensor when the inputs are one positional tensor, else None."""
        return self.args[0] if len(self.args) == 1 and not self.kwargs else None

    def __len__(self) -> int:
        return self.leaves()[0].shape[0]

    def __getitem__(self, index: Any) -> Inputs:
        """The samples at ``index`` (a slice or an index tensor) of every input."""
        return Inputs(
            tuple(a[index] for a in self.args), {k: v[index] for k, v in self.kwargs.items()}
        )

    def split(self, size: int) -> list[Inputs]:
        """Consecutive chunks of ``size`` samples (the last one may be shorter)."""
        return [self[i : i + size] for i in range(0, len(self), size)]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        return Inputs(tuple(fn(a) for a in self.args), {k: fn(v) for k, v in self.kwargs.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """On ``device``; floating inputs in ``dtype`` (integer and bool ones keep theirs)."""
        return self.map(lambda t: moved(t, device, dtype))

    def detach(self) -> Inputs:
        return self.map(torch.Tensor.detach)

    @property
    def device(self) -> torch.device:
        return self.leaves()[0].device

    def call(self, model: Callable[..., Any]) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def failure(self, model: Callable[..., Any]) -> Exception | None:
        """The error ``model`` raises on these inputs (run without grad), else None."""
        try:
            with torch.no_grad():
                self.call(model)
        except Exception as exc:
            return exc
        return None

    def describe(self) -> str:
        """Each input's name, shape (per batch) and dtype, for messages."""
        return ", ".join(
            f"{name} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            for name, t in self.named_leaves()
        )

    def placeholder_values(self, gm: fx.GraphModule) -> list[torch.Tensor | Any]:
        """The values of ``gm``'s placeholders, in graph order, when it is called with these
        inputs: flattened by the graph's input spec (a ``torch.export`` graph), else bound to
        the placeholders by position and then by name, defaults filling the rest."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
        if spec is not None:
            try:
                return list(tree_flatten_spec((self.args, self.kwargs), spec))
            except Exception as exc:
                raise DataError(
                    f"the inputs ({self.describe()}) do not match the structure the model was "
                    f"captured with ({spec}). Hint: give every batch the same inputs."
                ) from exc
        values: list[Any] = []
        for i, node in enumerate(placeholders):
            name = str(node.target).lstrip("*")
            if i < len(self.args):
                values.append(self.args[i])
            elif name in self.kwargs:
                values.append(self.kwargs[name])
            elif node.args:
                values.append(node.args[0])
            else:
                raise DataError(
                    f"{type(gm).__name__} takes input {name!r}, which the batches do not hold "
                    f"({self.describe()}). Hint: yield it in the batch (a dict key or tuple item)."
                )
        unused = set(self.kwargs) - {str(n.target) for n in placeholders}
        if len(self.args) > len(placeholders) or unused:
            raise DataError(
                f"{type(gm).__name__} takes {[str(n.target) for n in placeholders]}, the batches "
                f"hold {self.describe()}. Hint: yield only the model's inputs, or input_key=."
            )
        return values


LABEL_KEYS = frozenset({"label", "labels"})
"""Dict entries never passed as inputs: labels (a Hugging Face model would compute a loss)."""


def moved(
    t: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None
) -> torch.Tensor:
    """``t`` on ``device``, in ``dtype`` when it is floating (token ids and masks keep theirs)."""
    if dtype is not None and t.is_floating_point():
        return t.to(device, dtype)
    return t.to(device) if device is not None else t


def forward_parameters(model: Callable[..., Any]) -> tuple[list[str], list[str]]:
    """(required positional names, all named parameters) of ``model.forward``."""
    try:
        sig = inspect.signature(getattr(model, "forward", model))
    except (TypeError, ValueError):
        return [], []
    kinds = inspect.Parameter
    required = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
        and p.default is kinds.empty
    ]
    named = [
        p.name
        for p in sig.parameters.values()
        if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
    ]
    return required, named


def bind_batch(batch: Any, key: str | None = None, model: Callable[..., Any] | None = None):
    """The model inputs in one batch of a loader, labels dropped.

    - a tensor: the one positional input;
    - a dict: ``batch[key]`` when ``key`` is given; else the entries named like parameters of
      ``model.forward`` (``input_ids``, ``attention_mask``, ``pixel_values``, ...) as keyword
      inputs (never ``label``/``labels``); else its first entry (``{"image": x, "label": y}``);
    - a tuple or list: as many leading tensors as ``forward`` has required positional
      parameters (one without a model: ``(input, label)``).
    """
    if isinstance(batch, Inputs):
        return batch
    if isinstance(batch, torch.Tensor):
        return Inputs((batch,))
    required, named = forward_parameters(model) if model is not None else ([], [])
    if isinstance(batch, dict):
        if key is not None:
            if key not in batch:
                raise DataError(
                    f"the loader yields dicts with keys {sorted(batch)}, and input_key={key!r} is "
                    "not one of them. Hint: pass input_key= naming the input tensor's key."
                )
            return Inputs((_tensor(batch[key], key, batch),))
        matching = {k: v for k, v in batch.items() if k in named and k not in LABEL_KEYS}
        if matching and set(required) <= set(matching):
            return Inputs((), {k: _tensor(v, k, batch) for k, v in matching.items()})
        if not batch:
            raise DataError("the loader yields empty dicts. Hint: yield the model's inputs.")
        first = next(iter(batch))
        return Inputs((_tensor(batch[first], first, batch),))
    if isinstance(batch, (tuple, list)) and batch:
        count = max(1, min(len(required), len(batch)))
        return Inputs(tuple(_tensor(v, f"#{i}", batch) for i, v in enumerate(batch[:count])))
    return Inputs((_tensor(batch, "#0", batch),))


def _tensor(value: Any, name: str, batch: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise DataError(
            f"the loader yields {type(value).__name__} as input {name}, not a tensor (batch type "
            f"{type(batch).__name__}). Hint: yield tensors, (tensor, label) pairs, or dicts of "
            "tensors (input_key= naming the input when the dict holds labels too)."
        )
    return value
