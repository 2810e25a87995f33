"""Whether running statistics that disagree with the audit batches are stale.

"The running statistics differ from these batches" has three causes: the statistics are stale
(the weights changed after they were taken, or they were loaded from elsewhere), the batches
differ from the training data (a narrower sample, crops of few images, another domain), or the
model was trained with its statistics frozen, so the weights fit them and not the batches'.
Only the first is fixed by recalibrating; in the third, recalibrating breaks the model. A
`stale-stats` finding therefore fails only with evidence of the first (measured on small
models trained for the purpose, tests/test_stale_evidence.py):

- labels or `--metric`: recalibrating (cross-fitted) raises the task metric beyond noise; with
  them, the metric alone decides;
- without labels, a local disagreement: the BN layers that run right before and right after
  this one fit the batches, so the data matches training at this depth and only the weights
  feeding this layer changed (the other causes move every layer, growing with depth);
- without labels, the model's own output: recalibrated statistics (cross-fitted) make it more
  confident, by `CONFIDENCE_GAIN` of its entropy and beyond noise. Stale statistics break a
  trained model, which recalibrating mends; narrower data and frozen-in statistics go the
  other way (recalibrating lowers the confidence).

Without such evidence the finding is a warning saying what was seen and what would decide.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from bnaudit.measure.impact import Evidence
from bnaudit.verdict.codes import hint
from bnaudit.verdict.results import Finding, LayerMetrics, Severity
from bnaudit.verdict.rules.numbers import fmt
from bnaudit.verdict.thresholds import JUDGED, Thresholds, is_stale

# Recalibrated statistics must lower the output's mean entropy by this share of it (and beyond
# noise) to count as evidence: a healthy model's recalibration moves it by a few percent.
CONFIDENCE_GAIN = 0.1
RISK = "if the model was trained with frozen statistics, recalibrating breaks it"


@dataclass(frozen=True)
class StaleEvidence:
    """What the audit measured about the cause of a disagreement, for the whole model."""

    labels: Evidence | None = None  # the task metric, with labels or --metric
    confidence: Evidence | None = None  # the output's confidence, without labels
    output_change: float = math.nan  # rel L2 change of the output from recalibrating all layers
    pattern: str = ""  # the depth profile, e.g. "4 of 4 BN layers judged disagree, ..."


def confident(e: Evidence | None) -> bool:
    """Recalibrated statistics make the output more confident, beyond noise and by
    `CONFIDENCE_GAIN` of its entropy."""
    return e is not None and e.better and e.difference >= CONFIDENCE_GAIN * abs(e.stored)


def local_disagreements(
    order: Sequence[str], metrics: dict[str, LayerMetrics], t: Thresholds, shared: set[str]
) -> dict[str, str]:
    """The stale layers whose neighbours in the running order fit these batches: layer → what
    shows it ("stem.1 before it and layer2.bn2 after it fit these batches")."""
    ran = [n for n in order if n in metrics and n not in shared]

    def fits(name: str) -> bool:
        m = metrics[name]
        return m.train.drift.judged == JUDGED and not is_stale(m, t)

    def broad(name: str) -> bool:
        # The typical channel is off, not a tail of them: a sample narrower than training moves
        # deep layers a little everywhere, which puts one layer's tail past the limits while
        # its neighbours stay under them (the median, as in a pooled check, shows it).
        d = metrics[name].train.drift
        return abs(d.log_var_median) >= t.stale_log_var or d.shift_median >= t.stale_shift

    found = {}
    for i, name in enumerate(ran):
        if not (0 < i < len(ran) - 1 and is_stale(metrics[name], t) and broad(name)):
            continue
        before, after = ran[i - 1], ran[i + 1]
        if fits(ran[0]) and fits(before) and fits(after):
            found[name] = f"{before} before it and {after} after it fit these batches"
    return found


def depth_pattern(order: Sequence[str], metrics: dict[str, LayerMetrics], t: Thresholds) -> str:
    """How the disagreement spreads over the depth, in words."""
    judged = [n for n in order if n in metrics and metrics[n].train.drift.judged == JUDGED]
    off = [n for n in judged if is_stale(metrics[n], t)]
    first = " from the first to run on" if off and judged and off[0] == judged[0] else ""
    return f"{len(off)} of {len(judged)} BN layers judged disagree with these batches{first}"


def weigh_stale(
    findings: tuple[Finding, ...], evidence: StaleEvidence, local: str = ""
) -> tuple[Finding, ...]:
    """A layer's `stale-stats` finding as the evidence decides: FAIL with evidence of
    staleness, else WARN saying what was seen and what would decide."""
    return tuple(_weighed(f, evidence, local) if f.code == "stale-stats" else f for f in findings)


def _weighed(f: Finding, ev: StaleEvidence, local: str) -> Finding:
    labels, conf = ev.labels, ev.confidence
    if labels is not None:
        if labels.better:
            raised = f"recalibrating raises {labels.change()}"
            return _fail(f, f"; {raised}", ev, measured=raised)
        if labels.worse:
            return _warn(
                f,
                f"; but recalibrating to these batches lowers {labels.change()}",
                hint("stale-stats", "worse"),
            )
        return _warn(
            f,
            f"; recalibrating does not change {labels.change()}, within noise",
            hint("stale-stats", "no-gain", metric=labels.metric),
        )
    if local:
        return _fail(f, f"; the disagreement is local: {local}", ev)
    if confident(conf):
        assert conf is not None  # confident() says so
        return _fail(
            f,
            f"; recalibrated statistics make the output more confident: mean entropy "
            f"{fmt(-conf.stored)} -> {fmt(-conf.recalibrated)} nats (cross-fitted, beyond noise; "
            "this reads the output as class scores, which embeddings or regression outputs are "
            "not: labels or --metric decide there)",
            ev,
        )
    return _warn(f, f"; no evidence that they are stale: {_seen(ev)}", f.hint)


def _seen(ev: StaleEvidence) -> str:
    conf = ev.confidence
    if conf is None:
        said = "the output's confidence was not measured"
    elif conf.worse:
        said = (
            f"recalibrated statistics make the output less confident (mean entropy "
            f"{fmt(-conf.stored)} -> {fmt(-conf.recalibrated)} nats, cross-fitted)"
        )
    else:
        said = "recalibrated statistics do not make the output clearly more confident"
    return f"{ev.pattern}; {said}" if ev.pattern else said


def _fail(f: Finding, why: str, ev: StaleEvidence, measured: str = "") -> Finding:
    """FAIL, with a hint that says what recalibrating changes and either whether it helped
    (`measured`, with labels) or the risk of doing it unchecked."""
    change = (
        f"; recalibrating every layer changes the eval output by {fmt(ev.output_change)} "
        "relative L2"
        if math.isfinite(ev.output_change)
        else ""
    )
    risk = f"; measured: {measured}" if measured else f"; {RISK}: check the task metric after"
    fix = hint("stale-stats", "stale") + change + risk
    return dataclasses.replace(f, severity=Severity.FAIL, message=f.message + why, hint=fix)


def _warn(f: Finding, why: str, fix: str) -> Finding:
    return dataclasses.replace(
        f, severity=min(f.severity, Severity.WARN), message=f.message + why, hint=fix
    )
