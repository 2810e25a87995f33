"""What a path given on the command line is, said in one line when it is not a regular file.

`Path.exists()` answers False for a symlink loop and raises for a name too long; `is_file()`
is False for a FIFO and a device alike. Here each case gets its own cause.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for a stat mode that is not a regular file."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def input_problem(path: Path) -> str | None:
    """Why `path` cannot be read as an input file, or None when it is a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "no such file"
        if exc.errno == errno.ELOOP:
            return "a loop of symbolic links"
        if exc.errno == errno.ENAMETOOLONG:
            return "the path or a name in it is too long for the file system"
        return f"cannot read it ({exc.strerror or exc})"
    if not stat.S_ISREG(mode):
        return f"is {file_kind(mode)}, not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied: the file is not readable by this user"
    return None
