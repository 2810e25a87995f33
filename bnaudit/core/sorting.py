"""Natural order for names that carry numbers: layer2 before layer10, batch_2 before batch_10."""

from __future__ import annotations

import re

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> list[int | str]:
    """Sort key that puts layer2 before layer10."""
    return [int(p) if p.isdigit() else p for p in _DIGITS.split(text)]
