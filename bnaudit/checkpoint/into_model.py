"""Loading a checkpoint's state dict into the user's model, strictly, wrappers stripped.

A state dict saved from a wrapper (DataParallel's `module.`, an EMA or AveragedModel) loads into
the bare model once the wrapper's prefix is stripped; anything else that does not fit is refused
with every missing, unexpected and misshapen key named.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from bnaudit.checkpoint.selection import unwrap
from bnaudit.core.errors import CheckpointError, describe
from bnaudit.core.layers import counter_notes, read_counter
from bnaudit.core.untrusted import shorten

_SHOWN = 8  # keys listed in an error message before "and N more"


def load_into(model: nn.Module, state_dict: dict[str, Tensor], path: Path) -> tuple[str, ...]:
    """Load strictly, after stripping wrapper prefixes when that is what makes the keys match.

    Returns the report's notes on what loading took away or changed: the wrappers stripped
    (an AveragedModel's `n_averaged` set aside), counters of another dtype converted.
    """
    expected = set(model.state_dict())
    full = unwrap(state_dict)
    # Every outer part of the full prefix, the empty one first: a model that is itself a
    # wrapper (an AveragedModel built by --model) takes the keys as they are.
    wrappings = [full.outer(full.prefix[:i]) for i in _dot_ends(full.prefix)]
    candidates = [_strip(state_dict, w.prefix) for w in wrappings]
    best_at = min(
        range(len(candidates)), key=lambda i: len(_mismatch(expected, set(candidates[i])))
    )
    best, wrapping = candidates[best_at], wrappings[best_at]
    missing = sorted(k for k in expected - set(best) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(best) - expected)
    own = model.state_dict()
    # A lazy module's parameter (LazyLinear, LazyBatchNorm) has no shape until it takes the
    # checkpoint's: load_state_dict materialises it.
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in best.items()
        if k in own and isinstance(v, Tensor) and not is_lazy(own[k]) and v.shape != own[k].shape
    ]
    problems = [
        _listing("missing", missing),
        _listing("unexpected", unexpected),
        _listing("shape mismatch", shapes),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(
            f"{path}: the state dict does not fit --model: "
            + "; ".join(problems)
            + ". Check that --model builds the architecture this checkpoint was saved from"
        )
    notes = [*wrapping.notes(state_dict), *_counter_notes(best, own)]
    try:
        model.load_state_dict(best, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: load_state_dict failed: {describe(exc)}") from exc
    return tuple(notes)


def _dot_ends(prefix: str) -> list[int]:
    return [i for i in range(len(prefix) + 1) if i == 0 or prefix[i - 1] == "."]


def _mismatch(expected: set[str], got: set[str]) -> set[str]:
    return {k for k in expected ^ got if not k.endswith("num_batches_tracked")}


def _strip(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under `prefix`, without it: a wrapper's own keys (n_averaged) stay out."""
    if not prefix:
        return state_dict
    out: dict[str, Tensor] = OrderedDict(
        (k[len(prefix) :], v) for k, v in state_dict.items() if k.startswith(prefix)
    )
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:  # version info: old BN checkpoints load num_batches_tracked from it
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k[len(prefix) :] if k.startswith(prefix) else k, v) for k, v in meta.items()
        )
    return out


def _counter_notes(state_dict: dict[str, Tensor], own: dict[str, Tensor]) -> list[str]:
    """What load_state_dict does to counters of another dtype than the model's: converts them,
    silently truncating one that is no count (2.5 loads as 2, NaN as garbage)."""
    counters = {
        k.removesuffix("num_batches_tracked").removesuffix("."): (v, own[k])
        for k, v in state_dict.items()
        if k.rpartition(".")[2] == "num_batches_tracked" and k in own and v.dtype != own[k].dtype
    }
    notes = []
    for target in dict.fromkeys(o.dtype for _, o in counters.values()):
        notes += counter_notes(
            {n: v.dtype for n, (v, o) in counters.items() if o.dtype == target},
            f"; load_state_dict converted it to the model's {str(target).removeprefix('torch.')}",
        )
    bad = {n: read_counter(v)[1] for n, (v, _) in counters.items()}
    listed = [f"{n or '(top level)'} ({why})" for n, why in bad.items() if why]
    if listed:
        notes.append(
            "num_batches_tracked is no count in the checkpoint, and load_state_dict converted "
            f"it as it could (2.5 becomes 2, NaN garbage): {shorten(listed)}"
        )
    return notes


def _listing(label: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {label} ({', '.join(items[:_SHOWN])}{more})"
