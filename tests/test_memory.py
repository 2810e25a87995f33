"""bnaudit.memory drops clean file pages only, and the kernels load warm with the engine's types."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bnaudit import fused, memory
from bnaudit.engine import audit

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/smaps")

SMAPS = """\
7f0000000000-7f0000001000 r--p 00000000 08:01 42 /lib/libx.so
Rss:                   4 kB
Private_Clean:         4 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
Anonymous:             0 kB
Swap:                  0 kB
7f0000001000-7f0000003000 r-xp 00001000 08:01 42 /lib/libx.so
Rss:                   8 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
Anonymous:             0 kB
Swap:                  0 kB
7f0000003000-7f0000004000 r--p 00003000 08:01 42 /lib/libx.so
Rss:                   4 kB
Private_Dirty:         4 kB
Shared_Dirty:          0 kB
Anonymous:             4 kB
Swap:                  0 kB
7f0000004000-7f0000005000 rw-p 00004000 08:01 42 /lib/libx.so
Rss:                   4 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
Anonymous:             0 kB
Swap:                  0 kB
7f0000005000-7f0000006000 r-xp 00000000 08:01 43 /lib/libx.so.old
Rss:                   4 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
Anonymous:             0 kB
Swap:                  0 kB
7f0000006000-7f0000007000 r-xp 00000000 08:01 44 /lib/dir with space/libx.so
Rss:                   4 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
Anonymous:             0 kB
Swap:                  0 kB
7f0000007000-7f0000008000 r-xp 00000000 08:01 42 /lib/libx.so
Rss:                   4 kB
7f0000008000-7f0000009000 r-xp 00000000 08:01 42 /lib/libx.so
Rss:                   0 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
Anonymous:             0 kB
Swap:                  0 kB
"""


def test_only_clean_resident_mappings_of_the_named_file_are_chosen() -> None:
    maps = memory.parse_smaps(SMAPS)
    assert len(maps) == 8 and maps[5].path == "/lib/dir with space/libx.so"
    chosen = memory.clean_code(maps, "libx.so")
    # Not the relocated (dirty) data, the writable segment, another file, a mapping whose
    # counters are missing, nor one with nothing resident.
    assert memory.parse_smaps(SMAPS, "dir with") == [maps[5]]
    assert [(m.start, m.perms) for m in chosen] == [
        (0x7F0000000000, "r--p"),
        (0x7F0000001000, "r-xp"),
        (0x7F0000006000, "r-xp"),
    ]


def _rss_kib(path: Path) -> dict[str, int]:
    """Resident KiB per permission string of this process's mappings of `path`."""
    got: dict[str, int] = {}
    for m in memory.parse_smaps(Path("/proc/self/smaps").read_text()):
        if m.path == str(path):
            got[m.perms] = got.get(m.perms, 0) + m.counters["Rss"]
    return got


@linux
def test_release_drops_clean_pages_and_keeps_written_ones(tmp_path: Path) -> None:
    page = mmap.PAGESIZE
    data = bytes(range(256)) * (64 * page // 256)
    path = tmp_path / "libfake.so"
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # page-cache pages not yet written back count as dirty: kept
    with path.open("rb") as f:
        clean = mmap.mmap(f.fileno(), len(data), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    with path.open("r+b") as f:
        written = mmap.mmap(f.fileno(), len(data), access=mmap.ACCESS_COPY)  # rw-p
    try:
        assert sum(clean[i] for i in range(0, len(data), page)) >= 0  # make every page resident
        written[0:5] = b"moved"  # a private copy: only this process has it
        before = _rss_kib(path)
        assert before["r--p"] >= 64 * page // 1024 and before["rw-p"] > 0
        dropped = memory.release_clean_pages("libfake.so")
        after = _rss_kib(path)
        assert dropped == before["r--p"] and after["r--p"] == 0
        assert clean[:] == data  # read back from the file, unchanged
        assert written[0:5] == b"moved" and written[5:] == data[5:]
    finally:
        clean.close()
        written.close()


def test_release_does_nothing_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.release_clean_pages("libllvmlite.so") == 0


@pytest.mark.skipif(fused.kernels() is None, reason="numba is not installed")
def test_warm_kernels_have_the_engines_signature() -> None:
    """The load warms each single-thread kernel with the types the engine passes: an audit of
    NCHW and [B, C] layers then adds no second signature (a second compile or cache load)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 62 * 62, 8),
        nn.BatchNorm1d(8),
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the NCHW calls take measure_rows, not its parallel twin
    try:
        report = audit(model.eval(), [torch.randn(4, 3, 64, 64)], impact=False)
    finally:
        torch.set_num_threads(threads)
    k = fused.kernels()
    assert k is not None and len(report.layers) == 2
    assert len(k.measure_rows.signatures) == 1
    assert len(k.measure_inner.signatures) == 1
