"""How a batch feeds the model: which part is the input, which the labels, and the call itself."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.core.errors import DataError
from bnaudit.inputs.containers import is_namedtuple, map_tensors

# Names under which dict batches carry their labels (and which are then not model inputs).
LABEL_KEYS = ("label", "labels", "target", "targets", "y")

InputChoice = int | str | None  # --input: an element index, a key, or None (the convention)
SPREAD = "*"  # --input '*': every element (or key) is an argument of the forward


@dataclass(frozen=True)
class Call:
    """One batch as the model is called with it, and the labels that came with it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    labels: Tensor | None = None
    how: str = ""  # which part of the batch is the input, when the batch held more


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run the model on a batch (a `Call`, or a raw batch read by the convention of `to_call`)."""
    c = batch if isinstance(batch, Call) else to_call(model, batch)
    return model(*c.args, **c.kwargs)


def to_call(model: nn.Module, batch: Any, choice: InputChoice = None) -> Call:
    """How a batch feeds the model.

    A tensor is the input. A tuple or list (NamedTuple included) is spread as model(*batch)
    when the forward requires that many positional arguments; otherwise its first element is
    the input, as torch.optim.swa_utils.update_bn and fvcore's precise BN take it, and the
    others may be labels. A dict is passed as model(**batch) when the forward takes its keys,
    otherwise its label keys (`LABEL_KEYS`) are set aside. `choice` (--input) names the input
    element or key explicitly, or `SPREAD` passes every element.
    """
    if choice is not None:
        return _chosen(batch, choice)
    if isinstance(batch, (tuple, list)):
        required, most = _positional(model)
        if len(batch) <= 1 or required >= len(batch):
            return Call(tuple(batch), {})
        kind = "NamedTuple" if is_namedtuple(batch) else type(batch).__name__
        takes = f"at most {most}" if most < len(batch) else f"only {required} required"
        why = f"batches are {len(batch)}-element {kind}s; the forward takes {takes} positional"
        return _rest_as_labels(batch, 0, f"model(batch[0]): {why}")
    if isinstance(batch, dict):
        if _takes_keys(model, batch):
            return Call((), dict(batch))
        labels = [k for k in batch if k in LABEL_KEYS]
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        how = f"model(**batch) without {', '.join(map(repr, labels))} (taken as labels)"
        label = batch[labels[0]] if labels and isinstance(batch[labels[0]], Tensor) else None
        return Call((), inputs, label, how if labels else "")
    return Call((batch,), {})


def _chosen(batch: Any, choice: InputChoice) -> Call:
    if choice == SPREAD:
        if isinstance(batch, (tuple, list)):
            return Call(tuple(batch), {}, None, "model(*batch) (--input '*')")
        if isinstance(batch, dict):
            return Call((), dict(batch), None, "model(**batch) (--input '*')")
        return Call((batch,), {})
    if isinstance(choice, int):
        if not isinstance(batch, (tuple, list)):
            raise DataError(
                f"--input {choice}: batches are {type(batch).__name__}, not tuples or lists; "
                "give a key for dict batches, or leave --input out"
            )
        if not -len(batch) <= choice < len(batch):
            raise DataError(f"--input {choice}: batches have {len(batch)} elements")
        return _rest_as_labels(batch, choice % len(batch), f"model(batch[{choice}]) (--input)")
    if isinstance(batch, dict):
        if choice not in batch:
            raise DataError(
                f"--input {choice!r}: batches have no such key; they have "
                + ", ".join(map(repr, list(batch)[:8]))
            )
        rest = {k: v for k, v in batch.items() if k != choice}
        labels = next((rest[k] for k in LABEL_KEYS if isinstance(rest.get(k), Tensor)), None)
        if labels is None:
            labels = _label_like(list(rest.values()), batch[choice])
        return Call((batch[choice],), {}, labels, f"model(batch[{choice!r}]) (--input)")
    if is_namedtuple(batch) and choice in batch._fields:
        index = batch._fields.index(choice)
        return _rest_as_labels(batch, index, f"model(batch.{choice}) (--input)")
    raise DataError(
        f"--input {choice!r}: batches are {type(batch).__name__}, which has no such key or "
        "field; give an element index (0, 1, ...) for tuples and lists"
    )


def _rest_as_labels(batch: Any, index: int, how: str) -> Call:
    x = batch[index]
    rest = [b for i, b in enumerate(batch) if i != index]
    labels = _label_like(rest, x)
    if labels is not None:
        how += "; the labels: the other element holding one integer per sample"
    return Call((x,), {}, labels, how)


def _label_like(items: list[Any], x: Any) -> Tensor | None:
    """The first element holding one integer class per sample of `x` (a [B] integer tensor)."""
    rows = x.shape[0] if isinstance(x, Tensor) and x.dim() else None
    for item in items:
        if (
            isinstance(item, Tensor)
            and item.dim() == 1
            and not item.is_floating_point()
            and not item.is_complex()
            and item.dtype != torch.bool
            and (rows is None or item.shape[0] == rows)
        ):
            return item
    return None


def _positional(model: nn.Module) -> tuple[int, float]:
    """(required, at most) positional arguments of the model's forward; (0, inf) unknown."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a compiled or builtin forward
        return 0, math.inf
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    most = math.inf if any(p.kind is p.VAR_POSITIONAL for p in params) else len(positional)
    return required, most


def _takes_keys(model: nn.Module, batch: dict[Any, Any]) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return True
    named = {n for n, p in params.items() if p.kind is not p.POSITIONAL_ONLY}
    return all(k in named for k in batch)


def parse_input(text: str | int | None) -> InputChoice:
    """--input: digits (or -digits) are an element index, anything else a key."""
    if text is None or isinstance(text, int):
        return text
    stripped = text.strip()
    return int(stripped) if re.fullmatch(r"-?\d+", stripped) else stripped


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move every tensor to `device`; floating tensors take the model's floating dtype."""

    def move(t: Tensor) -> Tensor:
        if t.is_floating_point() and t.dtype != dtype:
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    if isinstance(batch, Call):
        labels = None if batch.labels is None else batch.labels.to(device)
        return Call(
            map_tensors(move, batch.args), map_tensors(move, batch.kwargs), labels, batch.how
        )
    return map_tensors(move, batch)
