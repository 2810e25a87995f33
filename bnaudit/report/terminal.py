"""The terminal: colour for verdicts and a progress line, each only where a person is looking.

Kept rather than drawn by rich (which typer brings), for measured reasons (issue 23):
- The bytes are fixed by tests: `tests/test_gate.py` asserts the verdict as `ESC[31;1mFAIL`
  (rich's `Style("bold red")` writes `ESC[1;31m`) and every progress frame as `CR ... ESC[K`
  with `0:02` clocks (rich.progress redraws from a refresh thread through `Live`, hides the
  cursor, and its elapsed column reads `0:00:02`).
- Which streams count as a terminal: rich also honours FORCE_COLOR and TTY_COMPATIBLE, so a CI
  log with FORCE_COLOR set would get colour and a progress line that rewrites itself.
- Start-up: typer 0.29 imports no rich module, nor does `bnaudit check`; `python -X importtime`
  gives this module 1.4 ms, rich.console 31-99 ms and rich.progress 42 ms on the shared 2-core
  machine, where `bnaudit check` of a 2-layer state dict without --model takes 1.9-3.2 s.
The figures are small beside torch, the first two reasons decide.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
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


BAR = 20  # cells of a progress bar with room for it
_MIN_BAR = 8  # narrower than this, the bar is left out


class Progress:
    """`[####....] audit 3/8 batches, 0:04, ETA 0:07` on one rewritten stderr line, once the
    audit has run `delay` s; a stage per pass over the batches (the audit's, each
    output-impact pass, each task-metric pass: `bnaudit.measure.progress`), its ETA from the pace of
    the batches of that stage so far.

    The line stays narrower than the terminal (`width`; None: COLUMNS, else the stream's
    terminal, else 80): a line that wraps cannot be rewritten in place, each frame would stay
    on screen. Short audits print nothing; `close` clears the line.
    """

    def __init__(
        self,
        stream: TextIO,
        delay: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.start = clock()
        self.delay = delay
        self.width = width
        self.shown = False
        self.stage = ""
        self.stage_start = self.last = self.start  # the previous batch ended at `last`

    def __call__(self, done: int, total: int | None, stage: str = "audit") -> None:
        now = self.clock()
        if stage != self.stage:
            self.stage, self.stage_start = stage, self.last
        self.last = now
        if now - self.start < self.delay:
            return
        of, eta = "", ""
        if total:
            of = f"/{total}"
            if done:
                pace = (now - self.stage_start) / done
                eta = f", ETA {_clock(pace * max(total - done, 0))}"
        text = f"{stage} {done}{of} batches, {_clock(now - self.start)}{eta}"
        room = (self.width or _columns(self.stream)) - 1  # the last column would wrap
        cells = min(BAR, room - len("bnaudit: [] ") - len(text))
        bar = ""
        if total and cells >= _MIN_BAR:
            filled = round(cells * min(done, total) / total)
            bar = "[" + "#" * filled + "." * (cells - filled) + "] "
        line = f"bnaudit: {bar}{text}"
        if len(line) > room:
            line = line[: max(room - 1, 0)] + "…"
        self.stream.write(f"\r{line}\033[K")
        self.stream.flush()
        self.shown = True

    def write(self, text: str) -> None:
        """A log line while the bar may be shown: on a line of its own, the bar redrawn at the
        next batch (a stream for the library's `log`)."""
        self.close()
        self.shown = False
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _columns(stream: TextIO, default: int = 80) -> int:
    """The terminal's width as the table takes it: COLUMNS, else the stream's own terminal,
    else `default` (a new pseudo-terminal says 0 columns: unknown)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return os.get_terminal_size(stream.fileno()).columns or default
    except (AttributeError, OSError, ValueError):  # no descriptor, or not a terminal
        return default


def _clock(seconds: float) -> str:
    """`0:07`, `12:03`, `1:02:03`."""
    s = int(seconds + 0.5)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
