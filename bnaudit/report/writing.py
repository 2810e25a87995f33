"""Report files, written as one set: all of them, or none replaced.

Every report of a run is first written in full to a temporary file next to its target (a short
name, so a target name near the file system's limit still has room for it), with the mode the
user's umask gives a new file. Only when every one is written are they renamed over their
targets, with SIGINT and SIGTERM held back meanwhile; a failed rename puts back what the earlier
ones replaced. A failure or an interruption before that removes the temporary files and leaves
every target as it was.

A report path must be a regular file or not exist yet: bnaudit never writes through a symbolic
link, and never replaces a device, FIFO or socket (`/dev/null`, `/dev/stdout`) with a file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bnaudit.core.errors import ReportError
from bnaudit.core.paths import file_kind

TEMP_PREFIX = ".bnaudit-"  # temporary files: .bnaudit-XXXXXXXX.tmp in the target's folder
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def check_writable(path: Path, inputs: Sequence[Path], option: str = "") -> None:
    """Refuse a report path that is an input, a link, not a regular file, too long, or whose
    folder is missing or read-only. `option` names the flag in the message."""
    label = f"{option} {path}" if option else str(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ReportError(f"{label}: cannot use it as a report path ({exc.strerror})") from None
    if mode is not None and stat.S_ISLNK(mode):
        raise ReportError(
            f"{label}: is a symbolic link; bnaudit does not write reports through links "
            "(it would replace the link): give the path of the file itself"
        )
    if mode is not None and not stat.S_ISREG(mode):
        also = (
            " (for stdout, use --format instead)" if stat.S_ISCHR(mode) and option != "-o" else ""
        )
        raise ReportError(
            f"{label}: is {file_kind(mode)}, not a regular file; bnaudit writes a new file and "
            f"renames it over the old, which would replace it{also}"
        )
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links above it, a name too long
        raise ReportError(f"{label}: cannot resolve the path ({exc})") from None
    for inp in inputs:
        with contextlib.suppress(OSError, RuntimeError):
            if inp.exists() and target == inp.resolve():
                raise ReportError(f"{label}: refusing to write a report over an input file")
    folder = target.parent
    if not folder.is_dir():
        raise ReportError(f"{label}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ReportError(f"{label}: folder {folder} is not writable")
    limit = _name_max(folder)
    if len(os.fsencode(target.name)) > limit:
        raise ReportError(
            f"{label}: the file name is {len(os.fsencode(target.name))} bytes, over this file "
            f"system's limit of {limit}"
        )


def write_set(files: Sequence[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write every (target, write) pair: `write(tmp)` fills a temporary file, then all are
    renamed at once. Raises ReportError naming the target that failed; then none is replaced."""
    temps: list[Path] = []
    try:
        with _terminate_as_interrupt():
            for target, write in files:
                tmp = _temp_file(target)
                temps.append(tmp)
                try:
                    write(tmp)
                except OSError as exc:
                    raise ReportError(
                        f"{target}: cannot write it ({exc.strerror or exc}); no report of this "
                        "run was written"
                    ) from exc
            _rename_all([t for t, _ in files], temps)
            temps = []
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()


def text_writer(text: str) -> Callable[[Path], None]:
    """A `write` for `write_set` that puts `text` (UTF-8) in the file and syncs it."""

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return write


def _temp_file(target: Path) -> Path:
    folder = target.resolve().parent
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=".tmp")
    except OSError as exc:
        raise ReportError(f"{target}: cannot create a file in {folder} ({exc.strerror})") from exc
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a report is an ordinary file
    finally:
        os.close(fd)
    return Path(name)


def _rename_all(targets: list[Path], temps: list[Path]) -> None:
    """Rename each temp over its target, signals held; on a failure undo the earlier ones."""
    with _signals_held():
        backups: list[tuple[Path, Path | None]] = []  # (target, its old file kept as a link)
        try:
            for target, tmp in zip(targets, temps, strict=True):
                backups.append((target, _keep_old(target)))
                os.replace(tmp, target)
        except OSError as exc:
            for done, old in backups[:-1]:
                with contextlib.suppress(OSError):
                    if old is None:
                        done.unlink()
                    else:
                        os.replace(old, done)
            raise ReportError(
                f"{backups[-1][0]}: cannot replace it ({exc.strerror or exc}); the reports of "
                "this run were not written"
            ) from exc
        finally:
            for _, old in backups:
                if old is not None:
                    with contextlib.suppress(OSError):
                        old.unlink()


def _keep_old(target: Path) -> Path | None:
    """A second name (hard link) for the file at `target`, to put it back; None if none."""
    if not target.exists():
        return None
    old = Path(tempfile.mktemp(dir=target.resolve().parent, prefix=TEMP_PREFIX, suffix=".old"))
    try:
        os.link(target, old)
    except OSError:
        return None  # no hard links here: a failed later rename cannot restore this one
    return old


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while temporary files exist, so they are removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:  # the parent asked: keep it so
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the renames are done: a run is never half-written. Then
    the first one caught acts as it would have: an interrupt (the CLI exits 2).

    Deferred by Python handlers rather than a signal mask: a mask holds only the calling
    thread's signals, and torch's threads would take them. A signal the process ignores (a
    background job of a script ignores SIGINT) is left ignored: it is not deferred, and it
    would have done nothing at any other moment of the run either.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = [s for s in _SIGNALS if signal.getsignal(s) != signal.SIG_IGN]
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)  # Python's SIGINT handler raises KeyboardInterrupt
            else:
                raise KeyboardInterrupt  # SIG_DFL (an ignored signal was never held)
