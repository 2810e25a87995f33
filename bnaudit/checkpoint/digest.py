"""The SHA-256 that identifies an audited checkpoint in every report.

Hashing a 2 GB file takes about as long as importing torch (a second each on one core), so the
command line starts it on a thread as soon as it knows the path (`prefetch`) and the two
overlap: file reads and hashlib release the GIL. Reading the checkpoint later finds the result.

The static audit reads only the BN tensors of the file, so there the hash is most of the cost:
`bnaudit.gate.config.hash_skipped` says when `bnaudit check` leaves it out.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

_pending: dict[Path, _Hashing] = {}


class _Hashing(threading.Thread):
    def __init__(self, path: Path) -> None:
        # A daemon: a command that fails before it needs the hash does not wait for it.
        super().__init__(name="bnaudit-sha256", daemon=True)
        self.path = path
        self.hexdigest: str | None = None
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            self.hexdigest = _sha256(self.path)
        except OSError as exc:
            self.error = exc


def prefetch(path: Path) -> None:
    """Start hashing `path` in the background; `sha256_file(path)` collects it. Does nothing for
    what is not a regular file (the loader reports that)."""
    try:
        key = path.resolve()
        if not key.is_file() or key in _pending:
            return
    except (OSError, RuntimeError):  # RuntimeError: a loop of links (Python < 3.13)
        return
    job = _pending[key] = _Hashing(key)
    job.start()


def sha256_file(path: Path) -> str:
    """The file's SHA-256, from a `prefetch` of it if one was started, else computed now."""
    job = _pending.pop(path.resolve(), None)
    if job is None:
        return _sha256(path)
    job.join()
    if job.error is not None:
        raise job.error
    assert job.hexdigest is not None
    return job.hexdigest


# Large reads: the thread takes the GIL back once per chunk, and while torch imports it may wait
# a whole switch interval (5 ms) each time; 256 KiB chunks made hashing 60 % slower that way.
CHUNK = 16 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()
