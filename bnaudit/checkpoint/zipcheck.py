"""Proof that a torch zip archive is one archive whose records torch reads where the CRC is read.

torch's memory-mapped load reads a tensor's bytes straight from the file, at the offset its
local header gives, and never decompresses them; zipfile (the CRC check) decompresses and
locates records through the last central directory, adjusted for any data in front. Both read
the same bytes only when the archive is exactly what torch.save writes: every record stored
(not compressed, not encrypted), the records, the central directory and the end record tiling
the file from its first byte to its last, each local header agreeing with the directory. This
module checks that, reading only headers, and refuses anything else.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from bnaudit.core.errors import CheckpointError
from bnaudit.core.limits import MAX_PICKLE_BYTES

_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_LOCATOR64 = b"PK\x06\x07"
_ENCRYPTED = 0x1  # general-purpose flag bits
_STRONG_ENCRYPTION = 0x40
_HAS_DESCRIPTOR = 0x8
_RESAVE = "re-save it with torch.save (it writes every record stored, in one archive)"


def check_archive(path: Path, zf: zipfile.ZipFile, *, compressed_ok: bool = False) -> None:
    """Refuse what torch's reader and the CRC check could read differently; see the module doc.

    `zf` is the archive opened by zipfile on `path`; `compressed_ok` allows deflated records
    (TorchScript code, which torch.jit decompresses). Raises CheckpointError.
    """
    size = path.stat().st_size
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    with path.open("rb") as f:
        cd_start, cd_end = _directory_span(path, f, size)
        pos = 0  # the next byte that some structure must claim
        for info in infos:
            _check_record(path, info, compressed_ok)
            if info.header_offset != pos:
                raise _ambiguous(
                    path,
                    f"record {info.filename!r} starts at byte {info.header_offset}, not at "
                    f"{pos} where the previous structure ends",
                )
            pos = _local_end(path, f, info)
        if pos != cd_start:
            raise _ambiguous(
                path, f"bytes {pos}-{cd_start} lie between the last record and the directory"
            )
        if cd_end + 22 != size and not _zip64_tail(f, cd_end, size):
            raise _ambiguous(path, f"bytes after the directory (at {cd_end}) up to {size}")


def _check_record(path: Path, info: zipfile.ZipInfo, compressed_ok: bool) -> None:
    if info.flag_bits & (_ENCRYPTED | _STRONG_ENCRYPTION):
        raise CheckpointError(
            f"{path}: archive record {info.filename!r} is encrypted; torch.save never encrypts: "
            f"{_RESAVE}"
        )
    if info.compress_type != zipfile.ZIP_STORED and not (
        compressed_ok and info.compress_type == zipfile.ZIP_DEFLATED
    ):
        method = {zipfile.ZIP_DEFLATED: "deflated", 12: "bzip2", 14: "lzma", 93: "zstd"}.get(
            info.compress_type, f"compression method {info.compress_type}"
        )
        raise CheckpointError(
            f"{path}: archive record {info.filename!r} is {method}; torch's memory-mapped "
            "reader reads records as stored bytes, so it would audit the compressed bytes "
            f"(and a compressed record can inflate without bound): {_RESAVE}"
        )
    if info.filename.endswith("/data.pkl") and info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(
            f"{path}: data.pkl is {info.file_size} bytes, over bnaudit's limit of "
            f"{MAX_PICKLE_BYTES} (MAX_PICKLE_BYTES); a state dict's pickle is ~100 bytes per "
            "tensor: the file is not a state dict bnaudit can audit"
        )


def _local_end(path: Path, f, info: zipfile.ZipInfo) -> int:
    """Where the record ends (data and descriptor); its local header must match the directory."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != _LOCAL:
        raise _ambiguous(path, f"no local header for {info.filename!r} where the directory says")
    flags, method = struct.unpack("<HH", header[6:10])
    size_c, _, name_len, extra_len = struct.unpack("<IIHH", header[18:30])
    name = f.read(name_len)
    if method != info.compress_type or (flags & _ENCRYPTED) or name != _raw_name(info):
        raise _ambiguous(
            path, f"the local header of {info.filename!r} disagrees with the directory"
        )
    data_end = info.header_offset + 30 + name_len + extra_len + info.compress_size
    if not flags & _HAS_DESCRIPTOR:
        if size_c not in (info.compress_size, 0xFFFFFFFF):
            raise _ambiguous(path, f"the sizes of {info.filename!r} disagree with the directory")
        return data_end
    f.seek(data_end)
    tail = f.read(24)
    for sig, fmt in ((_DESCRIPTOR, "<IQQ"), (_DESCRIPTOR, "<III"), (b"", "<IQQ"), (b"", "<III")):
        n = len(sig) + struct.calcsize(fmt)
        if tail[: len(sig)] == sig and len(tail) >= n:
            crc, csize, usize = struct.unpack(fmt, tail[len(sig) : n])
            if (crc, csize, usize) == (info.CRC, info.compress_size, info.file_size):
                return data_end + n
    raise _ambiguous(path, f"the data descriptor of {info.filename!r} disagrees with the directory")


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    if info.flag_bits & 0x800:
        return info.filename.encode("utf-8")
    return info.filename.encode("cp437")


def _directory_span(path: Path, f, size: int) -> tuple[int, int]:
    """(start, end) of the central directory, from an end record that closes the file."""
    if size < 22:
        raise _ambiguous(path, "no end-of-central-directory record")
    f.seek(size - 22)
    eocd = f.read(22)
    if eocd[:4] != _EOCD:
        raise _ambiguous(
            path,
            "the file does not end with the zip end record (a comment, or bytes appended after "
            "the archive)",
        )
    disk, cd_disk, _, _, cd_size, cd_offset, _comment = struct.unpack("<HHHHIIH", eocd[4:])
    if disk or cd_disk:
        raise _ambiguous(path, "a multi-disk archive")
    if cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        f.seek(size - 22 - 20)
        locator = f.read(20)
        if locator[:4] != _LOCATOR64:
            raise _ambiguous(path, "a zip64 end record without its locator")
        (eocd64_at,) = struct.unpack("<Q", locator[8:16])
        f.seek(eocd64_at)
        eocd64 = f.read(56)
        if eocd64[:4] != _EOCD64 or eocd64_at + 56 + 20 + 22 != size:
            raise _ambiguous(path, "the zip64 end record is not where the locator says")
        cd_size, cd_offset = struct.unpack("<QQ", eocd64[40:56])
    return cd_offset, cd_offset + cd_size


def _zip64_tail(f, cd_end: int, size: int) -> bool:
    if cd_end + 56 + 20 + 22 != size:
        return False
    f.seek(cd_end)
    return f.read(4) == _EOCD64


def ends_like_zip(path: Path, size: int) -> bool:
    """The file ends with a zip end record (comment-free)."""
    if size < 22:
        return False
    with path.open("rb") as f:
        f.seek(size - 22)
        return f.read(4) == _EOCD


def _ambiguous(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a single torch.save archive: {what}. torch and bnaudit's CRC check could "
        f"read different bytes (two archives joined, data around the archive): {_RESAVE}, or "
        "restore the file from a trusted copy"
    )
