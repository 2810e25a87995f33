"""Writing to stdout and stderr: a full or closed stream is an error of the run, not a crash."""

from __future__ import annotations

import errno
import os
import sys

from bnaudit.core.errors import ReportError
from bnaudit.core.untrusted import middle_cut, one_line


def error(message: str) -> None:
    """An error on stderr, one line whatever it quotes (escaped, cut); under GitHub Actions
    also an annotation, and guarded: messages quote names from the checkpoint."""
    line = one_line(message)
    try:
        if os.environ.get("GITHUB_ACTIONS") != "true":
            sys.stderr.write(line + "\n")
        else:
            from bnaudit.report import github as annotations

            guarded = annotations.guard(line, annotations.new_token())
            # The annotation escapes line breaks its own way (%0A): only cut and made encodable.
            text = middle_cut(message.encode("utf-8", "backslashreplace").decode("utf-8"))
            error = annotations.command("error", text, title="bnaudit")
            sys.stderr.write(guarded + error + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # stderr closed or full: the exit code is all that is left to say it


def out(text: str) -> None:
    """Write to stdout now: a closed or full stdout (`> /dev/full`) is this run's error, exit 2
    with one line, not a traceback when Python flushes at exit."""
    try:
        if sys.stdout is None:
            raise OSError(errno.EBADF, "stdout is closed")
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        mute_stdout()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ReportError(
            f"cannot write to stdout ({why}); redirect it to a file with room, or to /dev/null"
        ) from None


def mute_stdout() -> None:
    """Point fd 1 at /dev/null, so that what is still buffered cannot fail again at exit."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass
