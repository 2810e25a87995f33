"""Reading checkpoints safely, building the user's model, and loading one into the other.

A checkpoint is untrusted input: it is always read with `torch.load(weights_only=True)`, which
refuses pickled code. A whole pickled `nn.Module` needs `trust=True` (the file's code runs), and
there is never a silent fallback from one to the other.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.errors import BnauditError, CheckpointError, ModelError, describe
from bnaudit.specs import import_object

# Where training scripts put the state dict inside a checkpoint dict, in the order tried.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
# Wrapper prefixes: DDP's `module.`, Lightning's `model.`.
WRAPPER_PREFIXES = ("module.", "model.")
_SHOWN = 8  # keys listed in an error message before "and N more"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    sha256: str
    state_dict: dict[str, Tensor] | None = None
    module: nn.Module | None = None  # a whole pickled module, loaded with trust=True
    source: str = "top level"  # where the state dict was found


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: Path, *, trust: bool = False) -> Checkpoint:
    """Read a checkpoint on the CPU; only tensors and plain containers unless `trust`."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; was the save interrupted?")
    sha = sha256_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if trust:
            raise CheckpointError(f"{path}: cannot unpickle it ({describe(exc)})") from exc
        raise CheckpointError(_refusal(path)) from exc
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable torch.save file ({describe(exc)}); is it truncated or in "
            "another format?"
        ) from exc
    return _unwrap(obj, path, sha, trust)


def _refusal(path: Path) -> str:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        found = []
    what = f" it would import {', '.join(found[:_SHOWN])}" if found else ""
    more = f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    return (
        f"{path}: refused to load: the file holds pickled Python objects, not only tensors;"
        f"{what}{more}. Loading it runs code from the file. Save a state dict instead "
        "(torch.save(model.state_dict(), path)), or rerun with --trust if you trust its source"
    )


def _unwrap(obj: Any, path: Path, sha: str, trust: bool) -> Checkpoint:
    if isinstance(obj, nn.Module):
        return Checkpoint(path, sha, module=obj, source="pickled module")
    if isinstance(obj, dict):
        # The known keys first: a training checkpoint also holds tensors of its own at the top
        # level (a `loss`, say), which must not make it look like a state dict.
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) and trust:
                return Checkpoint(path, sha, module=inner, source=f"key {key!r}")
            if isinstance(inner, dict) and _is_state_dict(inner):
                return Checkpoint(path, sha, state_dict=inner, source=f"key {key!r}")
        if _is_state_dict(obj):
            return Checkpoint(path, sha, state_dict=obj)
    keys = ", ".join(map(repr, list(obj)[:_SHOWN])) if isinstance(obj, dict) else ""
    raise CheckpointError(
        f"{path}: no state dict found: the file holds {type(obj).__name__}"
        + (f" with keys {keys}" if keys else "")
        + f"; expected a state dict, or a dict holding one under {', '.join(STATE_DICT_KEYS)}"
    )


def _is_state_dict(d: dict) -> bool:
    return (
        bool(d)
        and all(isinstance(k, str) for k in d)
        and any(isinstance(v, Tensor) for v in d.values())
    )


def build_model(spec: str) -> nn.Module:
    """Call the factory named by `spec` with no arguments; it must return an nn.Module."""
    try:
        factory = import_object(spec, what="--model")
    except BnauditError as exc:
        raise ModelError(str(exc)) from exc
    if not callable(factory):
        raise ModelError(f"--model {spec}: {type(factory).__name__} object is not callable")
    try:
        model = factory()
    except Exception as exc:
        raise ModelError(f"--model {spec}: the factory raised {describe(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"--model {spec}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def load_into(model: nn.Module, state_dict: dict[str, Tensor], path: Path) -> None:
    """Load strictly, after stripping wrapper prefixes when that is what makes the keys match."""
    expected = set(model.state_dict())
    candidates = [_strip(state_dict, p) for p in ("", *WRAPPER_PREFIXES, "module.model.")]
    best = min(candidates, key=lambda sd: len(_mismatch(expected, set(sd))))
    missing = sorted(k for k in expected - set(best) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(best) - expected)
    own = model.state_dict()
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in best.items()
        if k in own and isinstance(v, Tensor) and v.shape != own[k].shape
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
    try:
        model.load_state_dict(best, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: load_state_dict failed: {describe(exc)}") from exc


def _mismatch(expected: set[str], got: set[str]) -> set[str]:
    return {k for k in expected ^ got if not k.endswith("num_batches_tracked")}


def _strip(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if not prefix:
        return state_dict
    if not all(k.startswith(prefix) for k in state_dict):
        return {}
    out: dict[str, Tensor] = OrderedDict((k[len(prefix) :], v) for k, v in state_dict.items())
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:  # version info: old BN checkpoints load num_batches_tracked from it
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k[len(prefix) :] if k.startswith(prefix) else k, v) for k, v in meta.items()
        )
    return out


def _listing(label: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {label} ({', '.join(items[:_SHOWN])}{more})"
