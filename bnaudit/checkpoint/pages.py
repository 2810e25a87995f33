"""Page release of memory-mapped checkpoint files, once their BN tensors are copied out.

torch.load(mmap=True) and safetensors map the file privately; bnaudit never writes to it, so
every mapped page is a clean copy of the file that the kernel can drop and fault in again.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

_MADV_DONTNEED = 4  # Linux


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """This process's private mappings of `path` (start, length); [] where there are none or
    they cannot be told (not Linux). Private: torch.load's mmap, never written to by bnaudit,
    so every page is a clean copy of the file."""
    if not sys.platform.startswith("linux"):
        return []
    target = str(path.resolve())
    ranges = []
    try:
        with open("/proc/self/maps", errors="surrogateescape") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target and fields[1][3] == "p":
                    start, end = (int(v, 16) for v in fields[0].split("-"))
                    ranges.append((start, end - start))
    except (OSError, ValueError):
        return []
    return ranges


def release_ranges(ranges: list[tuple[int, int]]) -> None:
    """madvise(MADV_DONTNEED) on `mapped_ranges`' clean pages: nothing is lost, the data stays
    in the page cache."""
    if not ranges:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for start, length in ranges:
            madvise(start, length, _MADV_DONTNEED)
    except (OSError, AttributeError):
        return  # an optimisation of memory only
