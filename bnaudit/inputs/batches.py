"""Sample batches: reading --data specs (files, image folders, functions), synthetic batches.

How a batch then feeds the model is `bnaudit.inputs.calls`.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnaudit.checkpoint.refusals import refuse_allocations
from bnaudit.checkpoint.zipcheck import check_archive
from bnaudit.core.errors import BnauditError, CheckpointError, DataError, describe
from bnaudit.core.limits import MAX_DATA_BYTES, MAX_INFLATION
from bnaudit.core.paths import input_problem
from bnaudit.core.sorting import natural_key
from bnaudit.core.untrusted import quote

# Re-exported: bnaudit.check.audit (being rewritten) imports them from here, as before calls.py.
from bnaudit.inputs.calls import InputChoice as InputChoice
from bnaudit.inputs.calls import call_model as call_model
from bnaudit.inputs.containers import tensors
from bnaudit.inputs.images import (
    DEFAULT_MAX_IMAGES,
    DEFAULTS,
    ImageFolder,
    Preprocess,
    find_images,
    is_image,
)
from bnaudit.inputs.specs import import_object

TORCH_SUFFIXES = (".pt", ".pth")


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


def load_batches(
    spec: str,
    batch_size: int,
    *,
    preprocess: Preprocess = DEFAULTS,
    max_images: int | None = DEFAULT_MAX_IMAGES,
    seed: int = 0,
    call: dict[str, Any] | None = None,
) -> Iterable[Any]:
    """Read --data: a folder of images, .pt/.pth, .npy, .npz, or module:function returning an
    iterable of batches. Images are `preprocess`ed; a folder of more than `max_images` is
    sampled down to that many with `seed`.
    `call`: keyword arguments for the function (a rank's shard, `bnaudit.distributed`)."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    path = Path(spec)
    if path.is_dir():
        files, total = find_images(path, max_images, seed)
        return ImageFolder(files, batch_size, preprocess, total)
    if os.path.lexists(path) or path.suffix.lower() in (*TORCH_SUFFIXES, ".npy", ".npz"):
        return _load_file(path, batch_size)
    if ":" in spec:
        try:
            fn = import_object(spec, what="--data")
            batches = fn(**(call or {}))
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
    problem = input_problem(path)
    if problem:
        raise DataError(f"--data {path}: {problem}")
    if is_image(path):
        # torch.load would answer with its weights-only paragraph, which does not apply.
        raise DataError(
            f"--data {path}: this is an image; pass its folder (--data {path.parent}) to audit "
            "on every image in it"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            import numpy as np

            _check_npy(path)
            return split(
                torch.from_numpy(np.load(path, allow_pickle=False)), batch_size, f"--data {path}"
            )
        if suffix == ".npz":
            return _load_npz(path, batch_size)
        _check_torch_data(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (DataError, CheckpointError) as exc:
        raise DataError(str(exc) if str(exc).startswith("--data") else f"--data {exc}") from exc
    except Exception as exc:
        raise DataError(
            f"--data {path}: cannot read it ({describe(exc)}); save "
            "batches with torch.save(tensor_or_list, path) or numpy.save"
        ) from exc
    return _batches_from_object(obj, path, batch_size)


def _load_npz(path: Path, batch_size: int) -> list[Tensor]:
    import numpy as np

    _check_npz(path)
    with np.load(path, allow_pickle=False) as archive:
        arrays = [torch.from_numpy(archive[k]) for k in sorted(archive.files, key=natural_key)]
    if not arrays:
        raise DataError(f"--data {path}: the .npz holds no array")
    return split(arrays[0], batch_size, f"--data {path}") if len(arrays) == 1 else arrays


def _batches_from_object(obj: Any, path: Path, batch_size: int) -> list[Any]:
    if isinstance(obj, dict) and "batches" in obj:
        obj = obj["batches"]
    if isinstance(obj, Tensor):
        return split(obj, batch_size, f"--data {path}")
    if isinstance(obj, (list, tuple)) and obj:
        check_data_tensors(list(tensors(obj)), f"--data {path}")
        return list(obj)
    raise DataError(
        f"--data {path}: holds {type(obj).__name__}; expected a Tensor (split into "
        "--batch-size batches), a non-empty list/tuple of batches, or a dict with key 'batches'"
    )


def split(t: Tensor, batch_size: int, source: str) -> list[Tensor]:
    """Split along dim 0; a last batch of a single sample is dropped (BN cannot train on it).

    `source` names where the tensor came from, for the error message.
    """
    check_data_tensors([t], source)
    if t.dim() < 2 or t.shape[0] == 0:
        raise DataError(
            f"{source}: a tensor of shape {tuple(t.shape)} cannot be split into batches: "
            "expected [samples, channels, ...]"
        )
    parts = list(torch.split(t, batch_size))
    if len(parts) > 1 and parts[-1].shape[0] == 1:
        parts.pop()
    return parts


def check_data_tensors(found: list[Tensor], source: str) -> None:
    """Refuse data the model cannot run on, or that expands past MAX_DATA_BYTES: a stride-0
    tensor of a few bytes in the file can claim terabytes once batches are copied."""
    total = 0
    for t in found:
        if t.is_meta or t.layout != torch.strided or t.is_quantized:
            what = "meta" if t.is_meta else "quantized" if t.is_quantized else str(t.layout)
            raise DataError(
                f"{source}: holds a {what.removeprefix('torch.')} tensor of shape "
                f"{tuple(t.shape)}; sample batches must be dense tensors with data"
            )
        total += t.numel() * t.element_size()
    if total > MAX_DATA_BYTES:
        raise DataError(
            f"{source}: its tensors hold {total} bytes once expanded, over bnaudit's limit of "
            f"{MAX_DATA_BYTES} (MAX_DATA_BYTES); 10^3-10^4 samples are enough to audit: save "
            "fewer, or pass a module:function that yields batches"
        )


def _check_npy(path: Path) -> None:
    import numpy as np

    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read is None:
                return  # a newer header: numpy's own load reads it
            shape, _, dtype = read(f)
        except (ValueError, OSError, EOFError):
            return  # numpy's own load says what is wrong
    _check_size(math.prod(shape) * dtype.itemsize, f"--data {path}")


def _check_npz(path: Path) -> None:
    """Each member's declared size, from the zip directory, before anything is inflated."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError):
        return  # numpy's own load says what is wrong
    _check_size(sum(i.file_size for i in infos), f"--data {path}")
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED and i.file_size > MAX_INFLATION * max(
            i.compress_size, 1
        ):
            raise DataError(
                f"--data {path}: member {quote(i.filename)} inflates from {i.compress_size} to "
                f"{i.file_size} bytes, more than bnaudit's limit of {MAX_INFLATION}x "
                "(MAX_INFLATION) for real arrays: save it with numpy.savez (not _compressed)"
            )


def _check_torch_data(path: Path) -> None:
    """A torch.save data file: one stored archive, as for checkpoints
    (bnaudit.checkpoint.zipcheck)."""
    with path.open("rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    data_pkl = None
    if zipped:
        try:
            with zipfile.ZipFile(path) as zf:
                check_archive(path, zf)
                data_pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
        except (zipfile.BadZipFile, OSError):
            return  # torch.load says what is wrong
        if data_pkl is None:
            return
    refuse_allocations(path, data_pkl)  # the pickle bombs a checkpoint would be refused for


def _check_size(size: int, source: str) -> None:
    if size > MAX_DATA_BYTES:
        raise DataError(
            f"{source}: holds {size} bytes of arrays, over bnaudit's limit of {MAX_DATA_BYTES} "
            "(MAX_DATA_BYTES); 10^3-10^4 samples are enough to audit: save fewer"
        )
