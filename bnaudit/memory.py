"""The process's resident memory: the clean code pages that numba's LLVM leaves mapped.

Importing numba loads llvmlite's LLVM library (~180 MB on disk) and runs its static
initialisers, which are spread across the library's code: measured on Linux, ~90 MiB of that
code becomes resident at import (the kernel maps whole cached folios around each fault), a fixed
cost larger than the audit's own state. Once the kernels are loaded from the cache, LLVM runs
again only to compile or load another signature. Those pages are clean copies of the file, so
dropping them from this process (MADV_DONTNEED) loses nothing: a later use faults them back in
from the page cache, where they stay (what falls is the process's RSS, not the machine's page
cache). Only mappings that are not writable and hold no private (dirty or anonymous) page are
dropped: DONTNEED on a written private page would lose the write, e.g. relocated data (a
file's page-cache pages not yet written back to disk count as dirty too, and are kept).

Linux only (/proc/self/smaps, madvise through libc); elsewhere, and on any failure, nothing is
done.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from pathlib import Path

MADV_DONTNEED = 4  # the same value on every Linux architecture


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/self/smaps and the counters under it (KiB)."""

    start: int
    end: int
    perms: str
    path: str
    counters: dict[str, int]

    @property
    def clean(self) -> bool:
        """Not writable, and no page of it differs from the file."""
        private = ("Private_Dirty", "Shared_Dirty", "Anonymous", "Swap")
        # A missing counter counts as dirty: never drop what cannot be shown clean.
        return "w" not in self.perms and all(self.counters.get(k, 1) == 0 for k in private)


def parse_smaps(text: str, within: str = "") -> list[Mapping]:
    """The mappings of an smaps text, each with its KiB counters; with `within`, only those
    whose path contains it (the others' counters are not parsed: a process has hundreds)."""
    maps: list[Mapping] = []
    wanted = False
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":") and "-" in fields[0] and len(fields) >= 5:
            path = " ".join(fields[5:])
            wanted = within in path
            if wanted:
                start, end = (int(v, 16) for v in fields[0].split("-"))
                maps.append(Mapping(start, end, fields[1], path, {}))
        elif wanted and fields[0].endswith(":") and len(fields) >= 2 and fields[1].isdigit():
            maps[-1].counters[fields[0][:-1]] = int(fields[1])
    return maps


def clean_code(maps: list[Mapping], library: str) -> list[Mapping]:
    """The clean, resident mappings of the file whose name is `library`."""
    return [
        m for m in maps if Path(m.path).name == library and m.clean and m.counters.get("Rss", 0) > 0
    ]


def release_clean_pages(library: str) -> int:
    """Drop this process's resident clean pages of `library` (a file name, e.g.
    "libllvmlite.so"); returns the KiB dropped (0 where nothing could be)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        maps = parse_smaps(Path("/proc/self/smaps").read_text(), library)
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    dropped = 0
    for m in clean_code(maps, library):
        if madvise(m.start, m.end - m.start, MADV_DONTNEED) == 0:
            dropped += m.counters["Rss"]
    return dropped
