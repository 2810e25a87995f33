"""Running bnaudit on a pseudo-terminal, as a person sees its progress line."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

ANSI = re.compile("\033\\[[0-9;]*[mK]")


def run_on_pty(
    cmd: Sequence[object], env: dict[str, str], cwd: Path, timeout: float = 240
) -> tuple[list[str], bytes]:
    """Run `cmd` with stderr on a pty, asserting it exits 0: the stderr frames between
    carriage returns (colour codes removed), and stdout."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [str(c) for c in cmd], stderr=secondary, stdout=subprocess.PIPE, env=env, cwd=cwd
    )
    os.close(secondary)
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    out, _ = proc.communicate(timeout=60)
    os.close(primary)
    assert proc.returncode == 0, seen.decode(errors="replace")
    return [ANSI.sub("", f) for f in seen.decode().split("\r")], out
