"""Sample batches: reading --data specs, synthetic batches, and feeding a batch to a model."""

from __future__ import annotations

import inspect
import math
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.checkpoint.zipcheck import check_archive
from bnaudit.core.errors import BnauditError, CheckpointError, DataError, describe
from bnaudit.core.limits import MAX_DATA_BYTES, MAX_INFLATION
from bnaudit.core.paths import input_problem
from bnaudit.core.untrusted import quote
from bnaudit.inputs.containers import is_namedtuple, map_tensors, tensors
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


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


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
    if zipped:
        try:
            with zipfile.ZipFile(path) as zf:
                check_archive(path, zf)
        except (zipfile.BadZipFile, OSError):
            return  # torch.load says what is wrong


def _check_size(size: int, source: str) -> None:
    if size > MAX_DATA_BYTES:
        raise DataError(
            f"{source}: holds {size} bytes of arrays, over bnaudit's limit of {MAX_DATA_BYTES} "
            "(MAX_DATA_BYTES); 10^3-10^4 samples are enough to audit: save fewer"
        )
