"""Writing new checkpoints: the input's own container with only the changed tensors replaced.

A Lightning checkpoint stays a Lightning checkpoint, a safetensors file a safetensors file;
every other key and tensor is what the input held. Files are written atomically (a temporary
file in the output's folder, then a rename), never over the input, and never over an existing
file without `force`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnaudit.checkpoint.formats import FileKind, detect
from bnaudit.checkpoint.selection import Selection, select
from bnaudit.core.errors import CheckpointError, ReportError
from bnaudit.recalibrate.recalibration import Recalibration, updated_state_dict
from bnaudit.report.writing import check_writable, write_set


def check_output(src: Path, dst: Path, *, force: bool) -> None:
    """Refuse, before any work, an output over the input, existing, a link or device, or in a
    missing folder."""
    if os.path.lexists(dst) and not (dst.is_file() and not dst.is_symlink()):
        check_writable(dst, [src], "-o")  # says what it is instead
    if dst.exists() and dst.resolve() == src.resolve():
        raise ReportError(f"-o {dst}: is the input checkpoint; write the result elsewhere")
    if dst.exists() and not force:
        raise ReportError(f"-o {dst}: exists already; pass --force to replace it")
    if not dst.resolve().parent.is_dir():
        raise ReportError(f"-o {dst}: folder {dst.resolve().parent} does not exist")


def write_recalibrated(src: Path, dst: Path, r: Recalibration, key: str | None = None) -> str:
    """Write `src` with `r`'s statistics to `dst`; returns the state-dict prefix used."""
    kind, _ = detect(src)
    if kind.is_code:
        raise CheckpointError(
            f"{src}: {kind.value} is a compiled program, not a container bnaudit can rewrite; "
            "recalibrate the checkpoint it was made from"
        )
    if kind is FileKind.SAFETENSORS:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        state = load_file(str(src))
        with safe_open(str(src), framework="pt") as f:
            metadata = f.metadata()
        prefix = _prefix(state, r, src)
        new = updated_state_dict(state, r, prefix)
        atomic(dst, lambda tmp: save_file(new, str(tmp), metadata=metadata))
        return prefix
    obj = torch.load(src, map_location="cpu", weights_only=True)
    sel = select(obj, key, src, trust=False)
    state = sel.apply(obj)
    prefix = _prefix(state, r, src)
    obj = _put_back(obj, sel, updated_state_dict(state, r, prefix))
    atomic(dst, lambda tmp: torch.save(obj, tmp))
    return prefix


def _prefix(state: dict[str, Tensor], r: Recalibration, src: Path) -> str:
    """The key prefix (DDP's `module.`, ...) in front of the model's own layer names."""
    names = list(r.stats)
    suffix = f"{names[0]}.running_mean"
    for key in state:
        if key.endswith(suffix):
            prefix = key[: -len(suffix)]
            if all(f"{prefix}{n}.running_var" in state for n in names):
                return prefix
    raise CheckpointError(f"{src}: cannot find the running stats of {names[0]} in the file")


def _put_back(obj: Any, sel: Selection, new: dict[str, Tensor]) -> Any:
    if not sel.path and not sel.prefix:
        return new
    container = obj
    for part in sel.path[:-1] if not sel.prefix else sel.path:
        container = container[part]
    if sel.prefix:  # a flat dict: replace only the keys under the prefix
        for key, value in new.items():
            container[sel.prefix + key] = value
    else:
        container[sel.path[-1]] = new
    return obj


def atomic(dst: Path, write: Callable[[Path], None]) -> None:
    """Write `dst` through a temporary file (see `bnaudit.report.writing`), named for -o in
    errors."""
    try:
        write_set([(dst, write)])
    except ReportError as exc:
        raise ReportError(f"-o {exc}") from exc
