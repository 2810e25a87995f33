"""How the rules compare and print numbers.

Every rule handles non-finite numbers explicitly: NaN compares false, so `value > limit` alone
would let a NaN through; `over` counts it as over.
"""

from __future__ import annotations

import math

UPSTREAM_SHOWN = 3  # stale layers named in a downstream finding; deep models have dozens


def over(value: float, limit: float) -> bool:
    """value > limit, where a NaN value counts as over: an unmeasurable check does not pass."""
    return math.isnan(value) or value > limit


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.3g}"


def pct(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def p_value(p: float) -> str:
    return "< 1e-300" if p < 1e-300 else f"{p:.2g}"


def few(names: tuple[str, ...], shown: int = UPSTREAM_SHOWN) -> str:
    """`a, b, c` or, past `shown`, `a, b, c and 5 more` (the first to run come first)."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")
