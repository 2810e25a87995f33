"""Rules on what the checkpoint stores: values, buffers, counter, momentum (no data needed)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from bnaudit.verdict.results import Finding, Severity
from bnaudit.verdict.rules.context import LayerContext
from bnaudit.verdict.rules.numbers import fmt, over
from bnaudit.verdict.thresholds import JUDGED, is_stale

# Half-precision buffer dtypes → (relative rounding step 2^-mantissa bits, what else goes wrong).
HALF = {
    "float16": (2.0**-11, "; values above 65504 overflow to inf"),
    "bfloat16": (2.0**-8, ""),
}


def nonfinite(c: LayerContext) -> Iterator[Finding]:
    m = c.m
    if m.nonfinite_values:
        yield c.finding(
            "nonfinite",
            Severity.FAIL,
            f"{m.nonfinite_values} NaN/Inf value(s) in weight, bias or running stats",
            m.nonfinite_values,
            0,
            "values",
        )
    elif m.nonfinite_outputs:  # finite values turned into NaN/Inf by the layer itself
        yield c.finding(
            "nonfinite",
            Severity.FAIL,
            f"{m.nonfinite_outputs} non-finite output value(s) on the sample batches",
            m.nonfinite_outputs,
            0,
            "outputs",
        )


def bad_var(c: LayerContext) -> Iterator[Finding]:
    m = c.m
    if m.negative_var_channels:
        yield c.finding(
            "bad-var",
            Severity.FAIL,
            f"running_var < 0 in {m.negative_var_channels} channel(s)",
            m.negative_var_channels,
            0,
            "negative",
        )
    if m.zero_var_channels:
        yield c.finding(
            "bad-var",
            Severity.WARN,
            f"running_var exactly 0 in {m.zero_var_channels} "
            "channel(s): eval mode divides by sqrt(eps) there",
            m.zero_var_channels,
            0,
            "zero",
        )


def tiny_var(c: LayerContext) -> Iterator[Finding]:
    m, t = c.m, c.t
    if math.isfinite(m.max_amplification) and m.max_amplification > t.max_amplification:
        yield c.finding(
            "tiny-var",
            Severity.WARN,
            f"max |gamma|/sqrt(running_var + eps) = "
            f"{fmt(m.max_amplification)} > {fmt(t.max_amplification)}",
            m.max_amplification,
            t.max_amplification,
        )


def half_buffers(c: LayerContext) -> Iterator[Finding]:
    if c.m.buffer_dtype in HALF:
        step, also = HALF[c.m.buffer_dtype]
        yield c.finding(
            "half-buffers",
            Severity.WARN,
            f"running stats stored in {c.m.buffer_dtype}: relative precision "
            f"{step:.1g}, so an update m*(batch - running) smaller than that "
            f"is rounded away and the statistics stall{also}",
        )


def bad_counter(c: LayerContext) -> Iterator[Finding]:
    if c.m.counter_problem:
        yield c.finding(
            "bad-counter",
            Severity.WARN,
            f"num_batches_tracked is not a count of batches: {c.m.counter_problem}",
        )


def no_counter(c: LayerContext) -> Iterator[Finding]:
    m = c.m
    # A counter that is there but wrong is bad-counter's.
    missing = m.num_batches_tracked is None and not m.counter_problem
    if missing and m.track_running_stats and m.kind != "instance":
        yield c.finding(
            "no-counter",
            Severity.INFO,
            "no num_batches_tracked: a FrozenBatchNorm-style layer, or saved by torch < 0.4.1",
        )


def no_running_stats(c: LayerContext) -> Iterator[Finding]:
    if not c.m.track_running_stats:
        yield c.finding(
            "no-running-stats",
            Severity.WARN,
            "track_running_stats=False: eval mode normalises with batch statistics",
        )


def init_stats(c: LayerContext) -> Iterator[Finding]:
    m = c.m
    if not m.track_running_stats:
        return
    if m.num_batches_tracked == 0 and not m.initial_stats:
        yield c.finding(
            "init-stats",
            Severity.INFO,
            "num_batches_tracked = 0 but the running stats are not "
            "the initial values: saved before the counter existed, or the counter was reset",
            situation="no-count",
        )
    elif m.initial_stats and m.kind == "frozen":
        yield c.finding(
            "init-stats",
            Severity.FAIL,
            "running stats are exactly the initial values (mean 0, var 1) of a frozen layer, "
            "which never updates them: they were never loaded",
            situation="frozen",
        )
    elif m.initial_stats and (m.num_batches_tracked or 0) > 0:
        yield c.finding(
            "init-stats",
            Severity.FAIL,
            "running stats are exactly the initial values (mean 0, var 1) although "
            f"num_batches_tracked = {m.num_batches_tracked}: reset or overwritten after the "
            "updates it counts",
            situation="reset",
        )
    elif m.initial_stats:
        yield c.finding(
            "init-stats",
            Severity.FAIL,
            "running stats are exactly the initial values "
            f"(mean 0, var 1; num_batches_tracked = {m.num_batches_tracked}): never updated",
            situation="never-updated",
        )


def momentum_warmup(c: LayerContext) -> Iterator[Finding]:
    m, t = c.m, c.t
    # Initial stats are init-stats' (T >= 1 leaves it no other case).
    if not m.track_running_stats or m.initial_stats or (m.num_batches_tracked or 0) < 1:
        return
    # NaN init_weight from an unknown momentum is not a finding.
    known = m.momentum is None or not math.isnan(m.momentum)
    if not (known and over(m.init_weight, t.max_init_weight)):
        return
    # A few updates may also be a cumulative average over few batches (update_bn leaves
    # T = batches): when the data confirms the stats, the residue is only a possibility.
    if m.stale_judged != JUDGED:
        sev, situation, why = Severity.WARN, "unverified", ""
    elif is_stale(m, t):
        sev, situation, why = Severity.WARN, "stale", "; the stats do not fit the data either"
    else:
        sev, situation = Severity.INFO, "verified"
        why = "; the stats fit the data, so they were likely averaged otherwise"
    yield c.finding(
        "momentum-warmup",
        sev,
        f"after T = {m.num_batches_tracked} updates an EMA would still carry "
        f"(1-m)^T = {fmt(m.init_weight)} of the initial values (limit "
        f"{fmt(t.max_init_weight)}){why}",
        m.init_weight,
        t.max_init_weight,
        situation,
    )


def momentum_convention(c: LayerContext) -> Iterator[Finding]:
    m, t = c.m, c.t
    if m.momentum is not None and m.momentum >= t.keras_momentum:
        yield c.finding(
            "momentum-convention",
            Severity.WARN,
            f"momentum = {fmt(m.momentum)} >= "
            f"{fmt(t.keras_momentum)}: likely a Keras/TF value; the running stats are "
            "essentially the last batch",
            m.momentum,
            t.keras_momentum,
        )
