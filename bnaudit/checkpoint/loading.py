"""Reading checkpoints safely: one `Checkpoint` from a file, whatever its format.

A checkpoint is untrusted input. Its format is told from its bytes (`bnaudit.checkpoint.formats`);
pickles are read with `torch.load(weights_only=True)`, which refuses pickled code. Only `trust=True`
unpickles more (a whole `nn.Module`, or any object the weights-only loader refuses) and loads
TorchScript and torch.export programs, which are code; even then the weights-only load is tried
first, so a file that needs no trust runs nothing. Zip archives are memory-mapped, and the CRC of
every archive record is checked before bnaudit reads it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.checkpoint.digest import sha256_file
from bnaudit.checkpoint.formats import FileKind, ZipArchive, detect, safetensors_header
from bnaudit.checkpoint.pages import mapped_ranges, release_ranges
from bnaudit.checkpoint.pickles import SAFE_GLOBALS, pickle_protocol, unsafe_globals
from bnaudit.checkpoint.refusals import check_bn_tensors, refuse_allocations
from bnaudit.checkpoint.selection import Selection, select
from bnaudit.checkpoint.training import StepCount, step_count_of
from bnaudit.core.errors import CheckpointError, describe
from bnaudit.core.layers import KnownAttrs
from bnaudit.core.paths import input_problem
from bnaudit.core.sorting import natural_key
from bnaudit.core.untrusted import quote, shorten


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    sha256: str | None  # None: not computed (load_checkpoint(hashed=False))
    kind: FileKind = FileKind.TORCH_ZIP
    state_dict: dict[str, Tensor] | None = None
    module: nn.Module | None = None  # a whole pickled module, loaded with trust=True
    source: str = "top level"  # where the state dict was found
    notes: tuple[str, ...] = ()  # how it was read, for the report
    known: Mapping[str, KnownAttrs] = field(default_factory=dict)  # BN prefix → eps, momentum
    steps: StepCount | None = None  # a training checkpoint's step count (None: none found)
    archive: ZipArchive | None = None
    records: Mapping[str, str] | None = None  # state-dict key → zip record, for CRC checks
    training: frozenset[str] = frozenset()  # BN prefixes a program or ONNX graph runs in train mode
    # The file's private mappings, found at the first `release_pages` (empty: not looked for).
    _mapped: list[list[tuple[int, int]]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def verify(self, keys: Iterable[str]) -> None:
        """Check the CRC of the archive records behind these state-dict entries, before use.

        A no-op where the format has no checksums (legacy, safetensors) or every record was
        already checked (trusted and compiled loads).
        """
        if self.archive is None or self.records is None:
            return
        labels: dict[str, list[str]] = {}
        for key in keys:
            if key in self.records:
                labels.setdefault(self.records[key], []).append(key)
        self.archive.verify(
            sorted(labels, key=natural_key), {r: shorten(ks) for r, ks in labels.items()}
        )

    def release_pages(self) -> None:
        """Hand back the pages of the memory-mapped file that reading has mapped in.

        The kernel maps a whole page-cache folio (up to a few MB, after readahead) on each
        fault, so reading a few hundred small BN tensors scattered over a large file would map
        hundreds of MB. Once they are copied out (as `LayerAttrs` does), those pages are not
        needed; a later read would fault them in again. Linux only; elsewhere a no-op.

        The mappings are looked up once (reading /proc/self/maps costs more than the madvise):
        they stay as they are while this checkpoint's tensors, which hold them, are alive.
        """
        if not self._mapped:
            self._mapped.append(mapped_ranges(self.path))
        release_ranges(self._mapped[0])


def load_checkpoint(
    path: Path, *, trust: bool = False, key: str | None = None, hashed: bool = True
) -> Checkpoint:
    """Read a checkpoint on the CPU, whatever device it was saved from.

    Args:
        path: the file; its format is detected from its bytes, never from its name.
        trust: allow what runs code from the file (pickled objects, TorchScript, torch.export).
        key: which state dict to take from a checkpoint dict (`state_dict_ema`, nested with
            dots: `ema.module`), or a key prefix within a flat state dict; None: the first of
            STATE_DICT_KEYS, then EMA_KEYS.
        hashed: compute the file's SHA-256 (it reads the whole file); False leaves it None.
    """
    problem = input_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        kind, archive = detect(path)
        if kind.is_code and not trust:
            raise CheckpointError(
                f"{path}: refused to load: it is {kind.value}, which is compiled code: loading "
                "it runs that code. Rerun with --trust if you trust its source, or save a state "
                "dict instead (torch.save(model.state_dict(), path))"
            )
        sha = sha256_file(path) if hashed else None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({describe(exc)})") from exc
    if kind is FileKind.SAFETENSORS:
        return _from_safetensors(path, sha, key)
    if kind is FileKind.ONNX:
        from bnaudit.checkpoint.onnx_state import onnx_state  # onnx only when asked

        found = onnx_state(path)
        return Checkpoint(
            path,
            sha,
            kind,
            state_dict=found.state_dict,
            source="BatchNormalization nodes",
            notes=found.notes,
            known=found.known,
            training=found.training,
        )
    if kind.is_code:
        from bnaudit.checkpoint.programs import (
            load_program,  # torch.jit / torch.export only when asked
        )

        assert archive is not None  # both are zip archives
        program = load_program(path, kind, archive)
        sel = select(program.state_dict, key, path, trust=True)
        return Checkpoint(
            path,
            sha,
            kind,
            state_dict=sel.apply(program.state_dict),
            source=sel.source,
            notes=(*program.notes, *_source_notes(kind, sel)),
            known={
                k[len(sel.prefix) :]: v
                for k, v in program.known.items()
                if k.startswith(sel.prefix)
            },
            training=frozenset(
                k[len(sel.prefix) :] for k in program.training if k.startswith(sel.prefix)
            ),
        )
    return _from_pickle(path, sha, kind, archive, trust, key)


def _from_pickle(
    path: Path,
    sha: str | None,
    kind: FileKind,
    archive: ZipArchive | None,
    trust: bool,
    key: str | None,
) -> Checkpoint:
    if archive is not None:  # data.pkl is checked before a byte of it is unpickled
        archive.verify(archive.metadata_records)
    refuse_allocations(path, None if archive is None else archive.full("data.pkl"))
    notes: list[str] = []
    trusted = False
    try:
        obj = _torch_load(path, kind, weights_only=True)
    except pickle.UnpicklingError as exc:
        data_pkl = None if archive is None else archive.full("data.pkl")
        unsafe = unsafe_globals(path, data_pkl)
        if unsafe is None:
            raise CheckpointError(_damaged(path, kind, exc)) from exc
        if not trust:
            protocol = pickle_protocol(path, data_pkl)
            raise CheckpointError(_refusal(path, unsafe, exc, protocol)) from exc
        if archive is not None:  # the file's own code will walk all of it
            archive.verify(archive.data_records)
        try:
            obj = _torch_load(path, kind, weights_only=False)
        except Exception as exc2:
            raise CheckpointError(
                f"{path}: cannot load it even with --trust ({describe(exc2)})"
            ) from exc2
        trusted = True
        notes.append(
            "loaded with --trust: the file's pickle ran as Python code"
            + (f" (it imports {shorten(unsafe)})" if unsafe else "")
        )
    except Exception as exc:
        raise CheckpointError(_damaged(path, kind, exc)) from exc
    sel = select(obj, key, path, trust=trust)
    value = sel.apply(obj)
    steps = step_count_of(obj)
    if isinstance(value, dict):
        check_bn_tensors(value, path)
    notes += _source_notes(kind, sel)
    if isinstance(value, nn.Module):
        return Checkpoint(
            path,
            sha,
            kind,
            module=value,
            source=sel.source,
            notes=tuple(notes),
            archive=archive,
            steps=steps,
        )
    records = None
    if archive is not None and not trusted:
        records = _record_map(path, kind, archive, sel)
        if records is None:  # no map: check every tensor record instead of only those read
            archive.verify(archive.data_records)
    return Checkpoint(
        path,
        sha,
        kind,
        state_dict=value,
        source=sel.source,
        notes=tuple(notes),
        archive=archive,
        records=records,
        steps=steps,
    )


def _torch_load(path: Path, kind: FileKind, *, weights_only: bool, meta: bool = False) -> Any:
    # mmap: a tensor's bytes are read only when it is used, so a multi-gigabyte checkpoint costs
    # what its BN layers cost. The legacy format cannot be mapped. torch's warnings (pickle
    # protocol, storage deprecations) are dropped: bnaudit's own message says what went wrong,
    # and a warning must not turn into a failure under `python -W error`.
    with (
        torch.serialization.safe_globals(list(SAFE_GLOBALS)),
        warnings.catch_warnings(),
        openable_name(path) as name,
    ):
        warnings.simplefilter("ignore")
        return torch.load(
            name,
            map_location="meta" if meta else "cpu",
            weights_only=weights_only,
            mmap=kind is FileKind.TORCH_ZIP,
        )


def _record_map(
    path: Path, kind: FileKind, archive: ZipArchive, sel: Selection
) -> dict[str, str] | None:
    """State-dict key → the zip record holding its storage, or None when it cannot be told.

    A second, data-free load onto the meta device reads only data.pkl and records where each
    storage sits in the file (`_checkpoint_offset`); the zip's local headers name the record
    at that offset. Used to check the CRC of exactly the records a check reads.
    """
    try:
        meta = sel.apply(_torch_load(path, kind, weights_only=True, meta=True))
        assert isinstance(meta, dict)
        offsets = archive.data_offsets()
    except Exception:
        return None
    out = {}
    for key, t in meta.items():
        if not isinstance(t, Tensor):
            continue
        storage = t.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        found = offsets.get(offset)
        if found is None:  # torch locates records by torch.save's layout; this one has another
            raise CheckpointError(
                f"{path}: the archive is not laid out as torch.save writes it: the storage of "
                f"{quote(key)} would be read at byte {offset}, where no record's data starts; "
                "bnaudit cannot tell which bytes torch reads: re-save it with torch.save"
            )
        record, size = found
        if size != storage.nbytes():  # the memory-mapped read takes nbytes, whatever the record
            raise CheckpointError(
                f"{path}: archive record {archive.full(record)} holds {size} bytes, but the "
                f"storage it backs ({quote(key)}) needs {storage.nbytes()}; torch.save writes "
                "exactly what a storage needs: the file was altered, restore it from a "
                "trusted copy"
            )
        out[key] = record
    return out


@contextlib.contextmanager
def openable_name(path: Path) -> Iterator[str]:
    """A name C++ and Rust readers (torch, safetensors) can open. A file name that is not UTF-8
    (Python keeps its bytes as surrogates) cannot be passed to them, so such a file is named by
    an open descriptor while they read; a memory map made meanwhile outlives the descriptor."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        if not sys.platform.startswith("linux"):
            raise CheckpointError(
                f"{path}: the file name is not valid UTF-8, which torch cannot open on this "
                "system; rename the file"
            ) from None
        fd = os.open(path, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield name


def _refusal(path: Path, found: list[str], exc: BaseException, protocol: int) -> str:
    if not found and protocol >= 4:
        return (
            f"{path}: written with pickle protocol {protocol}, which torch's weights-only loader "
            "cannot read (it reads protocol 2, torch.save's default); save it again without "
            "pickle_protocol, or rerun with --trust if you trust its source: that runs code "
            "from the file"
        )
    if not found:
        return (
            f"{path}: torch's weights-only loader cannot read it ({_torch_cause(exc)}); rerun "
            "with --trust only if you trust its source: that runs code from the file"
        )
    return (
        f"{path}: refused to load: the file holds pickled Python objects, not only tensors; it "
        f"would import {shorten(found)}. Loading it runs code from the file. Save a state dict "
        "instead (torch.save(model.state_dict(), path)), or rerun with --trust if you trust its "
        "source"
    )


def _damaged(path: Path, kind: FileKind, exc: BaseException) -> str:
    why = (
        "the legacy format has no checksums, so it is probably truncated or damaged"
        if kind is FileKind.TORCH_LEGACY
        else "it is damaged or was written by something other than torch.save"
    )
    cause = _torch_cause(exc)
    return f"{path}: {kind.value} that torch cannot read ({cause}); {why}: copy it again"


def _torch_cause(exc: BaseException) -> str:
    """torch's real reason, not the weights-only boilerplate wrapped around it."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        cause = text.split(marker, 1)[1].strip().splitlines()[0]
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        cause = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return cause if len(cause) <= 160 else cause[:157] + "..."


def _from_safetensors(path: Path, sha: str | None, key: str | None) -> Checkpoint:
    from safetensors import safe_open

    header = safetensors_header(path)
    try:
        # get_tensor maps the file: a tensor's bytes are read only when it is used.
        with openable_name(path) as name, safe_open(name, framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in sorted(header, key=natural_key)}
    except Exception as exc:
        raise CheckpointError(f"{path}: the safetensors reader failed ({describe(exc)})") from exc
    if not state:
        raise CheckpointError(f"{path}: the safetensors file holds no tensor")
    check_bn_tensors(state, path)
    sel = select(state, key, path, trust=False)
    return Checkpoint(
        path,
        sha,
        FileKind.SAFETENSORS,
        state_dict=sel.apply(state),
        source=sel.source,
        notes=_source_notes(FileKind.SAFETENSORS, sel),
    )


def _source_notes(kind: FileKind, sel: Selection) -> tuple[str, ...]:
    notes = [f"checkpoint: {kind.value}; state dict from the {sel.source}"]
    if sel.others:
        alt = ", ".join(f"--key {k}" for k in sel.others)
        notes.append(f"the checkpoint holds other state dicts too; audit them with {alt}")
    if kind is FileKind.TORCH_ZIP:
        notes.append("integrity: CRC-32 checked for data.pkl and every tensor record read")
    elif kind is FileKind.TORCH_LEGACY:
        notes.append("integrity: the legacy format has no checksums; corruption may go unseen")
    elif kind is FileKind.SAFETENSORS:
        notes.append("integrity: header and offsets checked; safetensors has no checksums")
    return tuple(notes)
