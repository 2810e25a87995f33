"""Old import paths kept for one release: each warns once, then forwards to where its code went."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

REMOVED_IN = "0.3"


def alias(old: str, new: str) -> Callable[[str], Any]:
    """Warn that `old` moved to `new`; the returned module `__getattr__` forwards every name."""
    warnings.warn(
        f"{old} moved to {new}; import from there ({old} goes in bnaudit {REMOVED_IN})",
        DeprecationWarning,
        stacklevel=3,
    )
    module = importlib.import_module(new)

    def forward(name: str) -> Any:
        return getattr(module, name)

    return forward
