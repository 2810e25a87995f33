"""Rules on folding the layer into the conv/linear before it."""

from __future__ import annotations

from collections.abc import Iterator

from bnaudit.verdict.results import Finding, Severity
from bnaudit.verdict.rules.context import LayerContext
from bnaudit.verdict.rules.numbers import fmt, over

# Shared with bnaudit.measure.fold's docstring; kept here so that judging needs no torch.
FLOAT16_MAX = 65504.0
MIN_INT8_LEVELS = 8.0  # int8 levels a folded channel keeps, below which the fold is at risk


def fold_mismatch(c: LayerContext) -> Iterator[Finding]:
    f, t = c.m.fold, c.t
    if f.into and f.checked and over(f.ratio, t.max_error_ratio):
        yield c.finding(
            "fold-mismatch",
            Severity.FAIL,
            f"folded into {f.into}, the output differs from {f.into} -> BN: max abs err "
            f"{fmt(f.max_err)}, {fmt(f.ratio)}x the tolerance (limit "
            f"{fmt(t.max_error_ratio)}x)",
            f.ratio,
            t.max_error_ratio,
        )


def fold_risk(c: LayerContext) -> Iterator[Finding]:
    f, amplification = c.m.fold, c.m.stored.max_amplification
    if not f.into:
        return
    if f.weight_max > FLOAT16_MAX:
        yield c.finding(
            "fold-risk",
            Severity.WARN,
            f"folded into {f.into}, max |weight| or |bias| is {fmt(f.weight_max)}: "
            f"overflows float16 (max {FLOAT16_MAX:g}); fold scale up to "
            f"{fmt(amplification)}",
            f.weight_max,
            FLOAT16_MAX,
            "float16",
        )
    elif f.int8_levels < MIN_INT8_LEVELS:
        yield c.finding(
            "fold-risk",
            Severity.WARN,
            f"folded into {f.into}, the median output channel keeps "
            f"{fmt(f.int8_levels)} of 127 int8 per-tensor levels (limit "
            f"{MIN_INT8_LEVELS:g}); fold scale up to {fmt(amplification)}",
            f.int8_levels,
            MIN_INT8_LEVELS,
            "int8",
        )
