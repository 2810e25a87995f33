"""Numbers as every report shows them: three significant digits, `-` for none.

One definition for the terminal table, markdown, HTML, GitHub and the diff reports, so that a
value reads the same wherever a person meets it.
"""

from __future__ import annotations

import math

NONE = "-"  # a value not measured, not judged, or NaN


def num(value: float | int | None, digits: int = 3) -> str:
    """`value` to `digits` significant digits; an int as it is; None or NaN as `-`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def percent(fraction: float) -> str:
    """A margin as a percentage, without the sign: 0.05 -> `5`, to 3 significant digits."""
    return num(float(100 * fraction))


def share(fraction: float) -> str:
    """An agreement rate to one decimal, with the sign: 0.9731 -> `97.3%`."""
    return f"{100 * fraction:.1f}%"
