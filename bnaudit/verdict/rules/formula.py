"""Rules on whether the layer computes the BN formula: its outputs in train and eval mode, its
running-stat update, and what a forward-overriding subclass does."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from bnaudit.core.keys import ACTIVATION_KEY
from bnaudit.verdict.codes import SITUATION_HINTS
from bnaudit.verdict.results import Finding, Severity
from bnaudit.verdict.rules.context import LayerContext
from bnaudit.verdict.rules.numbers import fmt, over


@dataclass(frozen=True)
class Why:
    """The known mistake that comes closest to a reconstruction mismatch."""

    label: str
    err: float  # its max abs err
    ratio: float  # its err ratio
    key: str  # bnaudit.measure.explain's key


@dataclass(frozen=True)
class Mismatch:
    """One mode's output against the formula: the finding, or what an override adds to an
    exact normalisation (`variant`), or neither."""

    finding: Finding | None = None
    variant: str = ""


def not_reached(c: LayerContext) -> Iterator[Finding]:
    if not c.unreached:
        return
    initial = c.m.attrs.track_running_stats and c.m.stored.initial_stats
    why = (
        "; its running stats are the initial values (mean 0, var 1), as an unused module's are"
        if initial
        else ""
    )
    yield c.finding(
        "not-reached",
        Severity.INFO,
        f"no forward call reached this layer{why}; only the static checks that need no data "
        "ran on it",
    )


def recon_train(c: LayerContext) -> Iterator[Finding]:
    found = mismatch(c, "train").finding
    if found is not None:
        yield found


def recon_eval(c: LayerContext) -> Iterator[Finding]:
    found = mismatch(c, "eval").finding
    if found is not None:
        yield found


def running_update(c: LayerContext) -> Iterator[Finding]:
    m, u, t = c.m, c.m.update, c.t
    frozen = m.attrs.kind == "frozen"  # never updated
    if not (m.seen.calls and m.attrs.track_running_stats and not frozen):
        return
    pair = (u.mean_ratio, u.var_ratio)
    worst = math.nan if any(map(math.isnan, pair)) else max(pair)  # max() may drop a NaN
    if over(worst, t.max_error_ratio):
        yield c.finding(
            "running-update",
            Severity.FAIL,
            "one train step moves the running stats away "
            f"from (1-m)*old + m*batch: {fmt(u.mean_ratio)}x (mean), "
            f"{fmt(u.var_ratio)}x (var) the tolerance",
            worst,
            t.max_error_ratio,
            "stats",
        )
    if u.count_errors:
        yield c.finding(
            "running-update",
            Severity.FAIL,
            f"num_batches_tracked did not grow by 1 in {u.count_errors} train step(s)",
            u.count_errors,
            0,
            "counter",
        )


def nonstandard_forward(c: LayerContext) -> Iterator[Finding]:
    if not c.overrides_forward:
        return
    seen = c.m.seen
    formula = (recon_train, recon_eval, running_update)
    variants = [mismatch(c, mode).variant for mode in ("train", "eval")]
    variant = variants[1] or variants[0]  # eval's when both
    if any(next(rule(c), None) is not None for rule in formula):
        sev, what, situation = Severity.WARN, "and does not compute plain BN", "mismatch"
    elif variant:
        sev, what, situation = Severity.INFO, f"and its output is {variant}", "variant"
    elif seen.measured_at and seen.calls:
        what = f"and computes plain BN before what it adds (measured at the {seen.measured_at})"
        sev, situation = Severity.INFO, "inside"
    elif not seen.calls:  # nothing ran: there is no output to speak of
        sev, what, situation = Severity.INFO, "(not run, so not checked)", "unchecked"
    else:
        sev, what, situation = Severity.INFO, "and still computes plain BN", "plain"
    yield c.finding(
        "nonstandard-forward", sev, f"{c.type_name} overrides forward {what}", None, None, situation
    )


def mismatch(c: LayerContext, mode: str) -> Mismatch:
    """recon-train (`mode` "train") or recon-eval ("eval"): the output against the formula."""
    t = c.t
    code = f"recon-{mode}"
    ratio, err, why = _measured(c, mode)
    if not (c.m.seen.calls and over(ratio, t.max_error_ratio)):
        return Mismatch()
    if why is None:
        reason, situation = "", "undiagnosed"
    elif not why.ratio <= t.max_error_ratio:  # a NaN ratio explains nothing either
        reason = f"; no known mistake explains it (closest: {why.label}, err {fmt(why.err)})"
        situation = "unexplained"
    elif c.overrides_forward and why.key.startswith(ACTIVATION_KEY):
        exact = "the normalisation itself is exact"
        return Mismatch(variant=f"{why.label} (err {fmt(why.err)}); {exact}")
    else:
        reason = f"; it matches {why.label} (err {fmt(why.err)}) instead"
        situation = _explained(code, why.key)
    return Mismatch(
        c.finding(
            code,
            Severity.FAIL,
            f"{mode}-mode output differs from the BN formula: max abs err {fmt(err)}, "
            f"{fmt(ratio)}x the tolerance (limit {fmt(t.max_error_ratio)}x){reason}",
            ratio,
            t.max_error_ratio,
            situation,
            layer=c.name,
        )
    )


def _measured(c: LayerContext, mode: str) -> tuple[float, float, Why | None]:
    """(error ratio, max abs err, closest known mistake or None) of `mode`'s output."""
    r = (c.m.train if mode == "train" else c.m.eval).recon
    why = Why(r.explanation, r.explanation_err, r.explanation_ratio, r.explanation_key)
    return r.ratio, r.max_err, why if r.explanation else None


def _explained(code: str, key: str) -> str:
    """The hint situation of a reconstruction mismatch that explanation `key` fits."""
    if key.startswith(ACTIVATION_KEY):
        return "activation"
    if key in ("float16", "bfloat16"):
        return "half-rounding"
    return key if key in SITUATION_HINTS[code] else "explained"
