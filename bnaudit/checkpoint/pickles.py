"""What a pickle would import, found without running it; what the weights-only loader allows.

Used to tell the user what trusting a file would mean (the globals it imports) before anything
from it runs.
"""

from __future__ import annotations

import argparse
import functools
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

# Inert classes the weights-only loader may build: timm and torchvision's training scripts save
# their argparse arguments next to the weights. A Namespace is an attribute bag; building one
# runs no code from the file.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def scan_globals(stream: IO[bytes], pickles: int = 1) -> list[str]:
    """Every `module.name` the next `pickles` pickles in `stream` would import, once each.

    Disassembly only (pickletools), so it runs nothing. Raises ValueError on a truncated or
    garbled pickle.
    """
    return list(dict.fromkeys(iter_globals(stream, pickles)))


def iter_globals(stream: IO[bytes], pickles: int = 1) -> Iterator[str]:
    """The imports of the next `pickles` pickles, as met: GLOBAL, and protocol-4 STACK_GLOBAL
    (whose two strings may come from the memo)."""
    for _ in range(pickles):
        strings: list[str] = []
        memo: dict[int, Any] = {}
        last: Any = None
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in ("GLOBAL", "INST"):
                yield str(arg).replace(" ", ".")
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                yield f"{strings[-2]}.{strings[-1]}"
            if isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
                last = arg
                strings.append(arg)
            elif name in ("FRAME", "PROTO"):
                pass  # framing, not a value: the string before it may still be memoised
            elif name == "MEMOIZE":
                memo[len(memo)] = last
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = last
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                last = memo.get(int(arg))
                if isinstance(last, str):
                    strings.append(last)
            else:
                last = None
            if name == "STOP":
                break


def unsafe_globals(path: Path, data_pkl: str | None) -> list[str] | None:
    """What a torch.save file's pickle would import beyond what the weights-only loader allows.

    `data_pkl`: the zip record of the pickle, None for a legacy file. None when unreadable.
    """
    try:
        if data_pkl is not None:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        pass  # protocol-4 pickles defeat torch's scanner; ours below reads every protocol
    try:
        if data_pkl is not None:
            with zipfile.ZipFile(path) as zf, zf.open(data_pkl) as f:
                found = scan_globals(f)
        else:  # legacy: magic number, protocol, system info, then the object
            with path.open("rb") as f:
                found = scan_globals(f, pickles=4)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile):
        return None
    return [g for g in found if g not in allowed_globals()]


def allowed_globals() -> set[str]:
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}
    try:  # private in torch; without it every global is listed, which is still true
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed |= set(_get_allowed_globals())
    except ImportError:
        pass
    return allowed


def pickle_protocol(path: Path, data_pkl: str | None) -> int:
    """The pickle protocol of data.pkl (of the legacy file's first pickle): its second byte."""
    try:
        if data_pkl is None:
            with path.open("rb") as f:
                return f.read(2)[1]
        with zipfile.ZipFile(path) as zf, zf.open(data_pkl) as f:
            return f.read(2)[1]
    except (OSError, IndexError, zipfile.BadZipFile):
        return 0


# Protocol 2 (torch.save's) names builtins by their Python 2 module.
_BYTEARRAY = (("global", "builtins.bytearray"), ("global", "__builtin__.bytearray"))
_INT_OPS = ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4")
_SKIPPED = ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "MARK", "FRAME")


def oversized_allocation(stream: IO[bytes], pickles: int, limit: int) -> int | None:
    """The size of a `bytearray(n)` over `limit` that the next `pickles` pickles would build.

    The weights-only loader allows `builtins.bytearray`, so a pickle of a few bytes can ask for
    gigabytes. Disassembly only; the argument is followed through the memo. None when there is
    no such call; raises ValueError on a garbled pickle.
    """
    for _ in range(pickles):
        memo: dict[int, Any] = {}
        strings: list[str] = []
        last: Any = None
        armed = False  # the last value pushed was the bytearray global
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            value: Any = None
            if name in _SKIPPED:
                if name == "MEMOIZE":
                    memo[len(memo)] = last
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = last
                continue
            if name in ("GLOBAL", "INST"):
                value = ("global", str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                value = ("global", f"{strings[-2]}.{strings[-1]}")
            elif name in _INT_OPS:
                value = int(arg)
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                value = memo.get(int(arg))
                if isinstance(value, str):
                    strings.append(value)
            elif isinstance(arg, str):
                value = arg
                strings.append(arg)
            if armed and isinstance(value, int) and value > limit:
                return value
            armed = value in _BYTEARRAY
            last = value
            if name == "STOP":
                break
    return None


_MARK = object()  # a MARK on the simulated stack
_TUPLES = ("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3")
_HASHING = ("SETITEM", "SETITEMS", "DICT", "ADDITEMS", "FROZENSET")


def hashed_tuple_size(stream: IO[bytes], pickles: int, limit: int) -> int | None:
    """The size of a tuple over `limit` that the next `pickles` pickles would hash, or None.

    Unpickling a dict key or a set member hashes it, and hashing a tuple visits every element
    of every nested tuple, once per reference: tuples that reference the memo twice over make
    2^40 elements of a few hundred bytes. The stack is simulated from each opcode's stack
    effect, keeping for each tuple how many elements hashing it would visit. Disassembly only;
    raises ValueError on a garbled pickle.
    """
    for _ in range(pickles):
        stack: list[Any] = []
        memo: dict[int, Any] = {}
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name == "STOP":
                break
            if name == "MEMOIZE" or name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1] if stack else 1
                continue
            if name in ("GET", "BINGET", "LONG_BINGET", "DUP"):
                stack.append(memo.get(int(arg), 1) if name != "DUP" else stack[-1])
                continue
            items = _pop(stack, op.stack_before)
            if name in _HASHING:
                size = max(_hashed(name, items), default=0)
                if size > limit:
                    return size
            if name in _TUPLES:
                stack.append(1 + sum(i for i in items if i is not _MARK))
            else:
                stack.extend(_pushed(op))
    return None


def _pop(stack: list[Any], before: list[Any]) -> list[Any]:
    """The items an opcode takes off `stack`: down to its MARK and what lies below the mark,
    or its fixed count. A stack too short for them is a garbled pickle."""
    if pickletools.markobject in before:
        if _MARK not in stack:
            raise ValueError("a pickle opcode needs a MARK that is not on the stack")
        at = len(stack) - 1 - stack[::-1].index(_MARK)
        below = before.index(pickletools.markobject)
        if at < below:
            raise ValueError("pickle stack underflow")
        items = stack[at + 1 :]
        del stack[at - below :]
        return items
    if len(stack) < len(before):
        raise ValueError("pickle stack underflow")
    items = stack[len(stack) - len(before) :]
    del stack[len(stack) - len(before) :]
    return items


@functools.cache
def _pushed(op: pickletools.OpcodeInfo) -> tuple[Any, ...]:
    """What `op` leaves on the simulated stack: a MARK, or a value of size 1 (not a tuple)."""
    return tuple(_MARK if s is pickletools.markobject else 1 for s in op.stack_after)


def _hashed(name: str, items: list[Any]) -> list[int]:
    """The sizes of the values opcode `name` hashes among its `items`."""
    if name == "SETITEM":
        hashed = items[1:2]
    elif name in ("SETITEMS", "DICT"):
        hashed = items[0::2]
    elif name in ("ADDITEMS", "FROZENSET"):
        hashed = items
    else:
        return []
    return [i for i in hashed if isinstance(i, int)]
