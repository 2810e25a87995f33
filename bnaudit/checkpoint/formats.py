"""What a checkpoint file is, told from its bytes; zip CRCs; safetensors headers; pickle globals.

Nothing here unpickles a file or imports what it names: detection reads magic bytes and the zip
directory, the safetensors check parses a JSON header, and the pickle scan only disassembles.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import math
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnaudit.checkpoint.pickles import iter_globals
from bnaudit.checkpoint.zipcheck import check_archive, ends_like_zip
from bnaudit.core.errors import CheckpointError, describe
from bnaudit.core.limits import MAX_SAFETENSORS_HEADER, MAX_SAFETENSORS_KEYS
from bnaudit.core.untrusted import quote, short_repr

# The first pickle of every legacy (pre-1.6) torch.save file holds torch's MAGIC_NUMBER
# 0x1950a86a20f9469cfc6c as a LONG1 (after PROTO, and a FRAME from protocol 4 on).
LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_CHUNK = 1 << 20  # CRC checks stream records in pieces this size
_SHOWN = 8  # names listed in a message before "and N more"
_READS = (
    "bnaudit reads torch.save checkpoints (.pt, .pth, .bin, .ckpt), .safetensors files and ONNX "
    "models"
)

# safetensors dtype names → bytes per element (safetensors' own table).
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors refuses larger headers too

# Formats recognised only to say what they are: (magic, offset, description).
_FOREIGN = (
    (b"\x89PNG\r\n\x1a\n", 0, "a PNG image"),
    (b"\xff\xd8\xff", 0, "a JPEG image"),
    (b"GIF8", 0, "a GIF image"),
    (b"%PDF", 0, "a PDF document"),
    (b"\x89HDF\r\n\x1a\n", 0, "an HDF5 file (Keras/TensorFlow .h5?)"),
    (b"\x93NUMPY", 0, "a NumPy .npy array"),
    (b"\x1f\x8b", 0, "gzip-compressed data: decompress it first"),
    (b"BZh", 0, "bzip2-compressed data: decompress it first"),
    (b"\xfd7zXZ\x00", 0, "xz-compressed data: decompress it first"),
    (b"\x28\xb5\x2f\xfd", 0, "zstd-compressed data: decompress it first"),
    (b"ustar", 257, "a tar archive: extract the checkpoint first"),
    (b"version https://git-lfs", 0, "a Git LFS pointer, not the checkpoint: run `git lfs pull`"),
)


class FileKind(enum.Enum):
    """The formats bnaudit loads. The value says what the file is, for messages and reports."""

    TORCH_ZIP = "a torch.save zip archive"
    TORCH_LEGACY = "a legacy torch.save file (torch < 1.6)"
    SAFETENSORS = "a safetensors file"
    TORCHSCRIPT = "a TorchScript archive (torch.jit.save)"
    EXPORT = "a torch.export program (.pt2, torch.export.save)"
    ONNX = "an ONNX model (protobuf)"

    @property
    def is_code(self) -> bool:
        """Loading it runs code the file carries."""
        return self in (FileKind.TORCHSCRIPT, FileKind.EXPORT)


@dataclass(frozen=True)
class ZipArchive:
    """A torch zip archive: every record lives in one folder (`archive/data.pkl`, ...)."""

    path: Path
    folder: str
    names: tuple[str, ...]  # record names inside the folder

    def full(self, name: str) -> str:
        return f"{self.folder}/{name}"

    @property
    def data_records(self) -> list[str]:
        return [n for n in self.names if n.startswith("data/")]

    @property
    def metadata_records(self) -> list[str]:
        """data.pkl and the small records torch reads with it (version, byteorder, ...)."""
        return [n for n in self.names if not n.startswith("data/")]

    def verify(self, names: Iterable[str], labels: Mapping[str, str] | None = None) -> None:
        """Check the CRC-32 of each record, streamed; the first mismatch raises CheckpointError.

        torch's zip reader never checks CRCs, so a flipped bit would otherwise load silently.
        `labels` says what a record holds (state-dict keys), for the message.
        """
        try:
            with zipfile.ZipFile(self.path) as zf:
                for name in names:
                    try:
                        with zf.open(self.full(name)) as f:
                            while f.read(_CHUNK):
                                pass
                    except (zipfile.BadZipFile, EOFError, zlib.error, KeyError) as exc:
                        held = f" (holds {labels[name]})" if labels and name in labels else ""
                        raise CheckpointError(
                            f"{self.path}: archive record {self.full(name)}{held} is damaged "
                            f"({describe(exc)}); the file was corrupted in storage or transfer: "
                            "copy it again or restore it from a backup"
                        ) from exc
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(
                f"{self.path}: cannot reread the archive ({describe(exc)})"
            ) from exc

    def data_offsets(self) -> dict[int, tuple[str, int]]:
        """File offset of each data record's first byte → (record name, size), from the local
        headers."""
        out = {}
        with zipfile.ZipFile(self.path) as zf, self.path.open("rb") as f:
            for name in self.data_records:
                info = zf.getinfo(self.full(name))
                f.seek(info.header_offset)
                header = f.read(30)
                if len(header) < 30 or header[:4] != b"PK\x03\x04":
                    continue
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                out[info.header_offset + 30 + name_len + extra_len] = (name, info.file_size)
        return out


def detect(path: Path) -> tuple[FileKind, ZipArchive | None]:
    """The file's format from its bytes (never its name); anything else raises CheckpointError."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _detect_zip(path)
    if _is_pickle(head) and LEGACY_MAGIC in head[:24]:
        return FileKind.TORCH_LEGACY, None
    if _looks_safetensors(head):
        return FileKind.SAFETENSORS, None
    if _looks_onnx(head):
        return FileKind.ONNX, None
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); was the save interrupted?")
    if ends_like_zip(path, size):  # zipfile would read it, torch's reader would not
        raise CheckpointError(
            f"{path}: a zip archive with {head[:8].hex(' ')}... in front of it, not a single "
            "torch.save archive: remove what was prepended, or restore the file from a "
            "trusted copy"
        )
    raise CheckpointError(f"{path}: {_foreign(path, head, size)}; {_READS}")


def _detect_zip(path: Path) -> tuple[FileKind, ZipArchive | None]:
    try:
        with zipfile.ZipFile(path) as zf:
            full_names = zf.namelist()
            # One archive, tiling the file: what torch reads is what the CRC check reads. A
            # compiled program's code records are deflated; torch.load maps only tensor records.
            compiled = any(n.endswith(("/constants.pkl", "/archive_format")) for n in full_names)
            check_archive(path, zf, compressed_ok=compiled)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise CheckpointError(
            f"{path}: a zip archive (the torch.save format) that is truncated or damaged "
            f"({describe(exc)}): its directory, stored at the end, is missing or unreadable; "
            "the copy or download was probably cut off: fetch the file again"
        ) from exc
    folders = {n.split("/", 1)[0] for n in full_names}
    if len(folders) != 1 or not all("/" in n for n in full_names):
        raise _not_torch_zip(path, full_names)
    folder = folders.pop()
    names = tuple(n.split("/", 1)[1] for n in full_names)
    archive = ZipArchive(path, folder, names)
    if "constants.pkl" in names:
        return FileKind.TORCHSCRIPT, archive
    if "archive_format" in names or any(n.startswith("models/") for n in names):
        return FileKind.EXPORT, archive
    if ".data/extern_modules" in names:
        raise CheckpointError(
            f"{path}: a torch.package archive (code and pickles); bnaudit does not load these: "
            "save the model's state dict with torch.save(model.state_dict(), path) instead"
        )
    if "data.pkl" in names:
        return FileKind.TORCH_ZIP, archive
    raise _not_torch_zip(path, full_names)


def _not_torch_zip(path: Path, names: list[str]) -> CheckpointError:
    shown = _names(names)
    return CheckpointError(
        f"{path}: a zip archive that torch.save did not write: no <archive>/data.pkl record "
        f"(it holds {shown or 'no record'}); {_READS}"
    )


def _looks_safetensors(head: bytes) -> bool:
    """8-byte little-endian header length, then a JSON object: `{` right after."""
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def _looks_onnx(head: bytes) -> bool:
    """A ModelProto as every writer serialises it: field 1 (ir_version, a small varint) first,
    then the tag of another ModelProto field (2 to 20, a known wire type). Protobuf has no magic
    number; this is what `onnx.save` and the exporters write."""
    if len(head) < 3 or head[0] != 0x08 or not 1 <= head[1] <= 0x7F:
        return False
    field, wire = head[2] >> 3, head[2] & 7
    return 2 <= field <= 20 and wire in (0, 2)


def _foreign(path: Path, head: bytes, size: int) -> str:
    """What a file that is not a checkpoint looks like, in a few words."""
    for magic, offset, what in _FOREIGN:
        if head[offset : offset + len(magic)] == magic:
            return f"not a checkpoint: {what}"
    if _is_pickle(head):
        found: list[str] = []
        # The first MiB: enough for the imports, without reading huge byte strings. Where the
        # cut ends the scan (ValueError), what was found so far is still worth showing.
        with path.open("rb") as f, contextlib.suppress(ValueError):
            for name in iter_globals(io.BytesIO(f.read(1 << 20))):
                found.append(name)
        found = list(dict.fromkeys(found))
        imports = f"; unpickling it would import {_names(found)}" if found else ""
        return (
            f"a plain Python pickle (protocol {head[1]}), not written by torch.save, so it is "
            f"not loaded at all{imports}. Re-save it with torch.save"
        )
    text = _as_text(head)
    if text is None:
        return f"unknown binary format (first bytes: {head[:8].hex(' ')})"
    stripped = text.lstrip()
    if stripped[:1] in ("{", "[") and _is_json(path, size):
        return "a JSON text file, not a checkpoint"
    first = stripped.splitlines()[0][:40] if stripped else ""
    return f"a text file, not a checkpoint (it starts with {first!r})"


def _is_pickle(head: bytes) -> bool:
    """Starts with a PROTO opcode of protocol 2 to 5 (what torch.save and pickle.dump write)."""
    return len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5


def _as_text(head: bytes) -> str | None:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the 4096-byte boundary is still text.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return None
    printable = sum(c.isprintable() or c in "\n\r\t" for c in text)
    return text if printable >= 0.95 * max(len(text), 1) else None


def _is_json(path: Path, size: int) -> bool:
    if size > 16 << 20:  # big text: say "JSON" from its first character alone
        return True
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return False
    return True


def _names(items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors header, after checking every offset against the file.

    Runs before any tensor is read, so a truncated or hand-edited file gets a message that
    names the tensor and the byte counts instead of a failure deep inside the reader.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_SAFETENSORS_HEADER:
            raise CheckpointError(
                f"{path}: a safetensors header of {n} bytes, over bnaudit's limit of "
                f"{MAX_SAFETENSORS_HEADER} (MAX_SAFETENSORS_HEADER); real headers take ~100 "
                "bytes per tensor: split the file, or it is damaged"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: a safetensors file that is truncated: its header says {n} bytes of "
                f"JSON but the file has only {size} bytes; fetch the file again"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: a safetensors file whose header is not valid JSON ({describe(exc)}); "
            "the file is damaged: fetch it again"
        ) from exc
    except RecursionError:
        raise CheckpointError(
            f"{path}: a safetensors header nested too deeply to parse (a valid one is a flat "
            "object of tensor entries); the file is crafted or damaged"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: a safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    if len(header) > MAX_SAFETENSORS_KEYS:
        raise CheckpointError(
            f"{path}: a safetensors file of {len(header)} tensors, over bnaudit's limit of "
            f"{MAX_SAFETENSORS_KEYS} (MAX_SAFETENSORS_KEYS); split it into shards"
        )
    data_len = size - 8 - n
    spans = []
    for key, entry in header.items():
        spans.append((*_span(path, key, entry, data_len), key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin < end:
            raise CheckpointError(
                f"{path}: safetensors tensor {quote(key)} overlaps the one before it (bytes "
                f"{begin}-{stop}, previous ends at {end}); the header is damaged"
            )
        end = stop
    return header


def _span(path: Path, key: str, entry: Any, data_len: int) -> tuple[int, int]:
    ok = (
        isinstance(entry, dict)
        and entry.get("dtype") in SAFETENSORS_ITEMSIZE
        and isinstance(entry.get("shape"), list)
        and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(isinstance(o, int) for o in entry["data_offsets"])
    )
    if not ok:
        raise CheckpointError(
            f"{path}: safetensors entry {quote(key)} is malformed ({short_repr(entry)}): "
            f"expected a known dtype, a shape and two data_offsets; the header is damaged"
        )
    begin, stop = entry["data_offsets"]
    need = math.prod(entry["shape"]) * SAFETENSORS_ITEMSIZE[entry["dtype"]]
    if not 0 <= begin <= stop or stop - begin != need:
        raise CheckpointError(
            f"{path}: safetensors tensor {quote(key)} has offsets {begin}-{stop} but its dtype "
            f"{entry['dtype']} and shape {short_repr(entry['shape'])} need {need} bytes; the "
            "header is damaged"
        )
    if stop > data_len:
        raise CheckpointError(
            f"{path}: a safetensors file that is truncated: tensor {quote(key)} ends at byte "
            f"{stop} of the data section, which holds only {data_len} bytes; fetch the file again"
        )
    return begin, stop
