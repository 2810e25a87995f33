"""The SHA-256 that identifies an audited checkpoint in every report.

Hashing a 2 GB file takes about as long as importing torch (a second each on one core), so the
command line starts it on a thread as soon as it knows the path (`prefetch`) and the two
overlap: file reads and hashlib release the GIL. Reading the checkpoint later finds the result.

The static audit reads only the BN tensors of the file, so there the hash is most of the cost:
`skipped` says when `bnaudit check` leaves it out (docs/static-audit.md, "Provenance").
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from bnaudit.report import Format

if TYPE_CHECKING:
    from bnaudit.config import CheckSettings

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


OFF = "not computed: --no-hash (or hash = false in the configuration)"
QUICK_LOOK = "not computed: a static audit shown as a table only; --hash computes it"


def skipped(s: CheckSettings, environ: Mapping[str, str]) -> str | None:
    """Why `bnaudit check` with these settings leaves the SHA-256 out ("not computed: …"),
    None when it computes it.

    `s.hash` None (the default) hashes whatever is kept or gated on: a report file, a baseline,
    stdout in a machine-readable format, a run under GitHub Actions, and every audit with
    --model (its passes take longer than the hash, which runs beside them). What is left is a
    look at the table of a static audit, where the hash would cost more than the audit.
    """
    if s.hash is not None:
        return None if s.hash else OFF
    kept = (s.markdown, s.csv, s.json, s.html, s.junit, s.write_baseline)
    if (
        s.model is not None
        or any(path is not None for path in kept)
        or s.format is not Format.TABLE
        or s.github.enabled(environ)
    ):
        return None
    return QUICK_LOOK


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
