"""Untrusted text in messages: names from a checkpoint, file names, whatever a file holds.

Such text may carry line breaks, terminal escapes, GitHub workflow commands (`::error::`,
`##[error]`), undecodable bytes (a file name that is not UTF-8) or a million characters. In a
message it is shown escaped and cut, so that every message stays one line of sane length, and a
repr of a file's object never walks more than a few levels of it.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any

from bnaudit.core.limits import MAX_MESSAGE_CHARS, MAX_NAME_CHARS

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_REPR = reprlib.Repr()
_REPR.maxlevel = 3  # a DAG of shared tuples has 2^40 leaves: walk 3 levels of 6 items at most
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_NAME_CHARS


def clean(text: str) -> str:
    """`text` with control characters as visible `\\xNN` and undecodable bytes (surrogates
    from a non-UTF-8 file name) as `\\udcNN`: printable, one line, encodable as UTF-8."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def cut(text: str, limit: int = MAX_NAME_CHARS) -> str:
    """At most `limit` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


def plain(name: Any, limit: int = MAX_NAME_CHARS) -> str:
    """An untrusted name for a message, unquoted (an option's value): escaped, cut."""
    return cut(clean(str(name)), limit)


def quote(name: Any, limit: int = MAX_NAME_CHARS) -> str:
    """An untrusted name for a message: quoted, escaped, cut."""
    return "'" + cut(clean(str(name)), limit) + "'"


def short_repr(obj: Any) -> str:
    """repr of an object from a file, bounded in size and in the work of making it."""
    try:
        return cut(clean(_REPR.repr(obj)))
    except Exception:  # a repr that fails is the file's problem, not the message's
        return f"<{type(obj).__name__}>"


def one_line(message: str) -> str:
    """The backstop for every error line: escaped, and cut to MAX_MESSAGE_CHARS in the middle."""
    return middle_cut(clean(message))


def middle_cut(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """At most about `limit` characters, cut in the middle: what a message quotes at its start
    (a long path) leaves the cause at its end readable."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}...({len(text) - 2 * half} characters left out)...{text[-half:]}"


SHOWN = 8  # names listed in one message before "and N more"


def shorten(items: list[str]) -> str:
    """Names for a one-line message: cleaned, cut, the first `SHOWN` of them."""
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(cut(clean(i)) for i in items[:SHOWN]) + more
