"""Rules that compare the running stats with what the sample batches show."""

from __future__ import annotations

from collections.abc import Iterator

from bnaudit.verdict.results import Finding, Severity
from bnaudit.verdict.rules.context import LayerContext
from bnaudit.verdict.rules.numbers import few, fmt, over, p_value, pct
from bnaudit.verdict.thresholds import Thresholds, count_rule, has_gap, is_stale, off_channels


def stale_stats(c: LayerContext) -> Iterator[Finding]:
    m, t = c.m, c.t
    if not is_stale(m, t):
        return
    first = "; no BN layer that fits these batches runs before it" if c.runs_first else ""
    stale = m.train.drift
    # A warning until evidence says the statistics are stale rather than the batches different
    # from training, or the statistics frozen in training (`bnaudit.verdict.staleness`).
    yield c.finding(
        "stale-stats",
        Severity.WARN,
        "running stats do not describe the train-mode input, relative to these batches: "
        f"{_count(stale.fraction, m.attrs.channels, stale.p, t)}: mean shift up to "
        f"{fmt(stale.shift_max)} sd (limit {fmt(t.stale_shift)}), ln var ratio up to "
        f"{fmt(stale.log_var_max)} (limit +/-{fmt(t.stale_log_var)}); worst channel "
        f"{stale.channel}{first}",
        stale.fraction,
        t.stale_fraction,
        "unproven",
    )


def train_eval_gap(c: LayerContext) -> Iterator[Finding]:
    m, t = c.m, c.t
    # Stale stats explain a gap too: stale-stats says it first.
    if is_stale(m, t) or not has_gap(m, t):
        return
    gap = m.eval.drift
    msg = (
        "eval-mode input drifts from the running stats: "
        f"{_count(gap.fraction, m.attrs.channels, gap.p, t)}: mean shift "
        f"{fmt(gap.shift_max)} sd, ln var ratio {fmt(gap.log_var_max)}; the stats "
        "fit train mode"
    )
    if not c.upstream_stale:
        yield c.finding("train-eval-gap", Severity.WARN, msg, gap.fraction, t.stale_fraction, "gap")
        return
    upstream = few(c.upstream_stale)
    yield c.finding(
        "train-eval-gap",
        Severity.INFO,
        f"{msg}; likely a consequence of stale stats earlier in the forward pass ({upstream})",
        gap.fraction,
        t.stale_fraction,
        "downstream",
        upstream=upstream,
    )


def var_bias(c: LayerContext) -> Iterator[Finding]:
    u, t = c.m.update, c.t
    frozen = c.m.attrs.kind == "frozen"  # never normalised with batch statistics
    mismatch_scale = 1.0 - u.eval_scale
    if c.m.seen.calls and not frozen and over(mismatch_scale, t.var_bias_scale):
        yield c.finding(
            "var-bias",
            Severity.WARN,
            f"N = {c.m.seen.values_per_channel} values per channel: "
            f"running_var estimates the unbiased variance, {fmt(u.bessel_factor)}x the biased "
            f"one train mode uses (observed {fmt(u.var_ratio_observed)}x); eval outputs are "
            f"scaled by {fmt(u.eval_scale)} relative to train mode (limit "
            f"{fmt(1 - t.var_bias_scale)})",
            mismatch_scale,
            t.var_bias_scale,
        )


def _count(fraction: float, channels: int, p: float, t: Thresholds) -> str:
    """ "12 of 16 channels (75%) beyond ..." with the count rule's limits."""
    off = off_channels(fraction, channels)
    return (
        f"{off} of {channels} channels ({pct(fraction)}) beyond the limits and sample noise, "
        f"p = {p_value(p)} from noise alone (limits {pct(t.stale_fraction)}, "
        f"{count_rule(t).minimum(channels)} channels, p < {fmt(t.stale_alpha)})"
    )
