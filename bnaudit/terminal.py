"""The terminal: colour for verdicts and a progress line, each only where a person is looking."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import TextIO

_STYLES = {
    "ok": "32",  # green
    "pass": "32;1",
    "info": "36",  # cyan
    "warn": "33",  # yellow
    "fail": "31;1",  # bold red
}


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Untrusted text (layer names come from the checkpoint) for a terminal or a table:
    control characters, line breaks and escape sequences included, become visible `\\xNN`."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def color_enabled(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set to anything (no-color.org)."""
    return not environ.get("NO_COLOR") and is_terminal(stream)


def paint(text: str, verdict: str) -> str:
    """`text` in the colour of `verdict` (ok, pass, info, warn, fail); unchanged otherwise."""
    style = _STYLES.get(verdict.lower())
    return f"\033[{style}m{text}\033[0m" if style else text


class Progress:
    """`[####....] batch 3/8` on one rewritten stderr line, once the audit has run `delay` s.

    Short audits print nothing; `close` clears the line.
    """

    def __init__(self, stream: TextIO, delay: float = 0.5) -> None:
        self.stream = stream
        self.start = time.monotonic()
        self.delay = delay
        self.shown = False

    def __call__(self, done: int, total: int | None) -> None:
        if time.monotonic() - self.start < self.delay:
            return
        bar, of = "", ""
        if total:
            filled = round(20 * min(done, total) / total)
            bar, of = "[" + "#" * filled + "." * (20 - filled) + "] ", f"/{total}"
        self.stream.write(f"\rbnaudit: {bar}batch {done}{of}")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
