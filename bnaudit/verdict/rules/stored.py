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
    s, seen = c.m.stored, c.m.seen
    if s.nonfinite_values:
        yield c.finding(
            "nonfinite",
            Severity.FAIL,
            f"{s.nonfinite_values} NaN/Inf value(s) in weight, bias or running stats",
            s.nonfinite_values,
            0,
            "values",
        )
    elif seen.nonfinite_outputs:  # finite values turned into NaN/Inf by the layer itself
        yield c.finding(
            "nonfinite",
            Severity.FAIL,
            f"{seen.nonfinite_outputs} non-finite output value(s) on the sample batches",
            seen.nonfinite_outputs,
            0,
            "outputs",
        )


def bad_var(c: LayerContext) -> Iterator[Finding]:
    s = c.m.stored
    if s.negative_var_channels:
        yield c.finding(
            "bad-var",
            Severity.FAIL,
            f"running_var < 0 in {s.negative_var_channels} channel(s)",
            s.negative_var_channels,
            0,
            "negative",
        )
    if s.zero_var_channels:
        yield c.finding(
            "bad-var",
            Severity.WARN,
            f"running_var exactly 0 in {s.zero_var_channels} "
            "channel(s): eval mode divides by sqrt(eps) there",
            s.zero_var_channels,
            0,
            "zero",
        )


def tiny_var(c: LayerContext) -> Iterator[Finding]:
    s, t = c.m.stored, c.t
    if math.isfinite(s.max_amplification) and s.max_amplification > t.max_amplification:
        yield c.finding(
            "tiny-var",
            Severity.WARN,
            f"max |gamma|/sqrt(running_var + eps) = "
            f"{fmt(s.max_amplification)} > {fmt(t.max_amplification)}",
            s.max_amplification,
            t.max_amplification,
        )


def half_buffers(c: LayerContext) -> Iterator[Finding]:
    a = c.m.attrs
    if a.buffer_dtype in HALF:
        step, also = HALF[a.buffer_dtype]
        yield c.finding(
            "half-buffers",
            Severity.WARN,
            f"running stats stored in {a.buffer_dtype}: relative precision "
            f"{step:.1g}, so an update m*(batch - running) smaller than that "
            f"is rounded away and the statistics stall{also}",
        )


def bad_counter(c: LayerContext) -> Iterator[Finding]:
    if c.m.attrs.counter_problem:
        yield c.finding(
            "bad-counter",
            Severity.WARN,
            f"num_batches_tracked is not a count of batches: {c.m.attrs.counter_problem}",
        )


def no_counter(c: LayerContext) -> Iterator[Finding]:
    a = c.m.attrs
    # A counter that is there but wrong is bad-counter's.
    missing = a.num_batches_tracked is None and not a.counter_problem
    if missing and a.track_running_stats and a.kind != "instance":
        yield c.finding(
            "no-counter",
            Severity.INFO,
            "no num_batches_tracked: a FrozenBatchNorm-style layer, or saved by torch < 0.4.1",
        )


def no_running_stats(c: LayerContext) -> Iterator[Finding]:
    if not c.m.attrs.track_running_stats:
        yield c.finding(
            "no-running-stats",
            Severity.WARN,
            "track_running_stats=False: eval mode normalises with batch statistics",
        )


def init_stats(c: LayerContext) -> Iterator[Finding]:
    a, initial = c.m.attrs, c.m.stored.initial_stats
    if not a.track_running_stats:
        return
    if initial and c.unreached:  # an unused module keeps its initial values: not-reached says it
        return
    if a.num_batches_tracked == 0 and not initial:
        yield c.finding(
            "init-stats",
            Severity.INFO,
            "num_batches_tracked = 0 but the running stats are not "
            "the initial values: saved before the counter existed, or the counter was reset",
            situation="no-count",
        )
    elif initial and a.kind == "frozen":
        yield c.finding(
            "init-stats",
            Severity.FAIL,
            "running stats are exactly the initial values (mean 0, var 1) of a frozen layer, "
            "which never updates them: they were never loaded",
            situation="frozen",
        )
    elif initial and (a.num_batches_tracked or 0) > 0:
        yield c.finding(
            "init-stats",
            Severity.FAIL,
            "running stats are exactly the initial values (mean 0, var 1) although "
            f"num_batches_tracked = {a.num_batches_tracked}: reset or overwritten after the "
            "updates it counts",
            situation="reset",
        )
    elif initial:
        yield c.finding(
            "init-stats",
            Severity.FAIL,
            "running stats are exactly the initial values "
            f"(mean 0, var 1; num_batches_tracked = {a.num_batches_tracked}): never updated",
            situation="never-updated",
        )


def momentum_warmup(c: LayerContext) -> Iterator[Finding]:
    m, a, t = c.m, c.m.attrs, c.t
    # Initial stats are init-stats' (T >= 1 leaves it no other case).
    if not a.track_running_stats or m.stored.initial_stats or (a.num_batches_tracked or 0) < 1:
        return
    # NaN init_weight from an unknown momentum is not a finding.
    known = a.momentum is None or not math.isnan(a.momentum)
    if not (known and over(m.update.init_weight, t.max_init_weight)):
        return
    # A few updates may also be a cumulative average over few batches (update_bn leaves
    # T = batches): when the data confirms the stats, the residue is only a possibility.
    if m.train.drift.judged != JUDGED and c.batches:  # data, but none that could tell
        why = f"; these batches cannot tell: {m.train.drift.judged.removeprefix('no: ')}"
        sev, situation = Severity.WARN, "undecided"
    elif m.train.drift.judged != JUDGED:
        sev, situation, why = Severity.WARN, "unverified", ""
    elif is_stale(m, t):
        sev, situation, why = Severity.WARN, "stale", "; the stats do not fit the data either"
    else:
        sev, situation = Severity.INFO, "verified"
        why = "; the stats fit the data, so they were likely averaged otherwise"
    yield c.finding(
        "momentum-warmup",
        sev,
        f"after T = {a.num_batches_tracked} updates an EMA would still carry "
        f"(1-m)^T = {fmt(m.update.init_weight)} of the initial values (limit "
        f"{fmt(t.max_init_weight)}){why}",
        m.update.init_weight,
        t.max_init_weight,
        situation,
    )


def momentum_convention(c: LayerContext) -> Iterator[Finding]:
    a, t = c.m.attrs, c.t
    if a.momentum is not None and a.momentum >= t.keras_momentum:
        yield c.finding(
            "momentum-convention",
            Severity.WARN,
            f"momentum = {fmt(a.momentum)} >= "
            f"{fmt(t.keras_momentum)}: likely a Keras/TF value; the running stats are "
            "essentially the last batch",
            a.momentum,
            t.keras_momentum,
        )
