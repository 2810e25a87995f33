"""Sample batches: reading --data specs, synthetic batches, and feeding a batch to a model."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.errors import BnauditError, DataError, describe
from bnaudit.specs import import_object

TORCH_SUFFIXES = (".pt", ".pth")


def call_model(model: nn.Module, batch: Any) -> Any:
    """A tuple or list is passed as model(*batch), a dict as model(**batch)."""
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move every tensor to `device`; floating tensors take the model's floating dtype."""
    if isinstance(batch, Tensor):
        if batch.is_floating_point() and batch.dtype != dtype:
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(b, device, dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    return batch


def parse_shape(text: str) -> tuple[int, ...]:
    """'8x3x224x224' → (8, 3, 224, 224)."""
    parts = re.split(r"[x×,\s]+", text.strip().lower())
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise DataError(
            f"--input-shape {text!r} is not a shape: give positive sizes like 8x3x224x224 "
            "(batch first, channels second)"
        )
    return shape


def synthetic_batches(shape: tuple[int, ...], count: int, seed: int) -> Iterator[Tensor]:
    """N(0, 1) batches for a model without data; data-dependent verdicts are then not drawn."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(shape, generator=gen)


def load_batches(spec: str, batch_size: int) -> Iterable[Any]:
    """Read --data: .pt/.pth, .npy, .npz, or module:function returning an iterable of batches."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    path = Path(spec)
    if path.exists() or path.suffix.lower() in (*TORCH_SUFFIXES, ".npy", ".npz"):
        return _load_file(path, batch_size)
    if ":" in spec:
        try:
            fn = import_object(spec, what="--data")
            batches = fn()
        except BnauditError as exc:
            raise DataError(str(exc)) from exc
        except Exception as exc:
            raise DataError(f"--data {spec}: the function raised {describe(exc)}") from exc
        if isinstance(batches, Tensor):
            return split(batches, batch_size, f"--data {spec}")
        if not isinstance(batches, Iterable):
            raise DataError(
                f"--data {spec}: the function returned {type(batches).__name__}, not an "
                "iterable of batches"
            )
        return batches
    raise DataError(f"--data {spec}: no such file, and not a module:function spec")


def _load_file(path: Path, batch_size: int) -> list[Any]:
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            import numpy as np

            return split(
                torch.from_numpy(np.load(path, allow_pickle=False)), batch_size, f"--data {path}"
            )
        if suffix == ".npz":
            return _load_npz(path, batch_size)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"--data {path}: cannot read it ({describe(exc)}); save "
            "batches with torch.save(tensor_or_list, path) or numpy.save"
        ) from exc
    return _batches_from_object(obj, path, batch_size)


def _load_npz(path: Path, batch_size: int) -> list[Tensor]:
    import numpy as np

    with np.load(path, allow_pickle=False) as archive:
        arrays = [torch.from_numpy(archive[k]) for k in sorted(archive.files, key=_natural)]
    if not arrays:
        raise DataError(f"--data {path}: the .npz holds no array")
    return split(arrays[0], batch_size, f"--data {path}") if len(arrays) == 1 else arrays


def _batches_from_object(obj: Any, path: Path, batch_size: int) -> list[Any]:
    if isinstance(obj, dict) and "batches" in obj:
        obj = obj["batches"]
    if isinstance(obj, Tensor):
        return split(obj, batch_size, f"--data {path}")
    if isinstance(obj, (list, tuple)) and obj:
        return list(obj)
    raise DataError(
        f"--data {path}: holds {type(obj).__name__}; expected a Tensor (split into "
        "--batch-size batches), a non-empty list/tuple of batches, or a dict with key 'batches'"
    )


def split(t: Tensor, batch_size: int, source: str) -> list[Tensor]:
    """Split along dim 0; a last batch of a single sample is dropped (BN cannot train on it).

    `source` names where the tensor came from, for the error message.
    """
    if t.dim() < 2 or t.shape[0] == 0:
        raise DataError(
            f"{source}: a tensor of shape {tuple(t.shape)} cannot be split into batches: "
            "expected [samples, channels, ...]"
        )
    parts = list(torch.split(t, batch_size))
    if len(parts) > 1 and parts[-1].shape[0] == 1:
        parts.pop()
    return parts


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]
