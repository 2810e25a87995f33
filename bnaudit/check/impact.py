"""The audit's output-impact stage: how much recalibrated statistics change the model's output,
each flagged layer's share (attribution), and with labels the task metric's evidence.

It runs after the passes and the metrics (`bnaudit.check.audit`), on the batches the passes kept,
with the model's modes and buffers put back when it is done.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bnaudit.check.options import AuditOptions
from bnaudit.core.errors import DataError, describe
from bnaudit.core.layers import preserved
from bnaudit.inputs.batches import call_model
from bnaudit.measure.evidence import CONFIDENCE, CONFIDENCE_STAGE, applies, confidence, top1
from bnaudit.measure.evidence import measure as measure_evidence
from bnaudit.measure.impact import (
    TOP1,
    Across,
    Evidence,
    OutputDiff,
    OutputImpact,
    compare_outputs,
)
from bnaudit.measure.passes import Passes, recalibrated_stats
from bnaudit.measure.progress import ProgressFn, Ticking, impact_stage
from bnaudit.verdict.findings import Thresholds, has_gap, is_stale
from bnaudit.verdict.results import LayerMetrics
from bnaudit.verdict.staleness import local_disagreements

if TYPE_CHECKING:
    from bnaudit.distributed import Ranks


@dataclass(frozen=True)
class Impacted:
    """The output impact (None: not measured) and what it says, or why it was not measured."""

    impact: OutputImpact | None = None
    notes: tuple[str, ...] = ()


def output_impact(
    model: nn.Module,
    passes: Passes,
    metrics: dict[str, LayerMetrics],
    options: AuditOptions,
    ranks: Ranks | None,
    progress: ProgressFn | None,
) -> Impacted:
    if not (options.impact and passes.count and not options.synthetic_data):
        return Impacted()
    try:
        return _impact(model, passes, metrics, options, ranks, progress)
    except (RuntimeError, ValueError, TypeError) as exc:
        if ranks is not None:  # the other ranks wait for this one's comparison: stop them
            raise DataError(f"output impact: the forward failed ({describe(exc)})") from exc
        # e.g. quantization observers fed the stored non-finite statistics
        return Impacted(
            notes=(f"output impact not measured: the forward failed ({describe(exc)})",)
        )


def _impact(
    model: nn.Module,
    passes: Passes,
    metrics: dict[str, LayerMetrics],
    options: AuditOptions,
    across: Across | None = None,
    progress: ProgressFn | None = None,
) -> Impacted:
    """The output change from recalibrated statistics, and with labels the task metric's;
    what it cannot measure, and what the metric says, in its notes."""
    plain = passes  # the task metric's passes tick under their own stage names
    if progress is not None:
        ticked = Ticking(passes.batches, passes.count, progress, impact_stage)
        passes = dataclasses.replace(passes, batches=ticked)
    layers = [(n, m) for n, m in passes.layers.items()]
    with preserved(model, layers), torch.no_grad():
        stats, level_passes = recalibrated_stats(passes, options.regime, model, across)
        cost = level_passes * passes.count
        diff, used = compare_outputs(model, passes.batches, passes.layers, stats, passes.outputs)
        if across is not None:
            diff, used = across.diff(diff, used)
        cost += used
        per_layer, used = _attribution(model, passes, metrics, stats, options, across)
        cost += used
        confident = None
        if across is None:
            evidence, notes = _evidence(model, plain, list(stats), options, progress)
            if evidence is None and _disagree(metrics, options.thresholds, plain):
                confident = _confidence(model, plain, list(stats), options, progress)
                cost += confident.forward_passes if confident else 0
        else:  # cross-fitting pairs batches, which the ranks split between them
            evidence, notes = None, ()
            if options.metric is not None or any(c.labels is not None for c in plain.batches):
                notes = ("task-metric evidence not measured: not supported under torchrun",)
            if _disagree(metrics, options.thresholds, plain):
                notes = (
                    *notes,
                    "output-confidence evidence not measured: not supported under "
                    "torchrun, so a disagreement without a local pattern stays a warning",
                )
        cost += evidence.forward_passes if evidence else 0
    top1, basis = _top1(diff, plain, model)
    impact = OutputImpact(
        regime=options.regime,
        batches=passes.count,
        forward_passes=cost,
        rel_l2=diff.rel_l2,
        max_abs=diff.max_abs,
        top1_agreement=top1,
        per_layer=per_layer,
        evidence=evidence,
        top1_basis=basis,
        confidence=confident,
    )
    return Impacted(impact, notes)


def _top1(diff: OutputDiff, passes: Passes, model: nn.Module) -> tuple[float | None, str]:
    """The top-1 agreement only where the output may be class scores, and what it assumes.

    By shape: one [B, K] tensor, K >= 2, on every batch (`OutputDiff`); per-frame logits
    [B, T, ...], embeddings or maps of other ranks never qualify. A [B, K] output is not
    always class scores (per-frame logits [B, T], embeddings [B, 1280]): class labels, one
    integer in [0, K) per sample, show that it is; labels of another form show that it is
    not; without labels the report says what it assumed.
    """
    if diff.top1 is None:
        return None, ""
    calls = list(passes.batches)
    if calls and all(c.labels is not None for c in calls):
        first = passes.outputs[0] if passes.outputs else call_model(model.eval(), calls[0])
        return (diff.top1, "") if applies(first, calls[0].labels) else (None, "")
    return diff.top1, f"assumes the [B, {diff.width}] output is class scores"


def _attribution(
    model: nn.Module,
    passes: Passes,
    metrics: dict[str, LayerMetrics],
    stats: dict[str, Any],
    options: AuditOptions,
    across: Across | None,
) -> tuple[dict[str, float], int]:
    """With `attribution`, each flagged layer's output change alone, the worst first; the
    forward passes it took."""
    if not options.attribution:
        return {}, 0
    t = options.thresholds
    flagged = sorted(
        (n for n, m in metrics.items() if n in stats and _flagged(m, t)),
        key=lambda n: -max(metrics[n].train.drift.fraction, metrics[n].eval.drift.fraction),
    )[: options.attribution_max]
    per_layer: dict[str, float] = {}
    cost = 0
    for name in flagged:
        alone, used = compare_outputs(
            model, passes.batches, passes.layers, {name: stats[name]}, passes.outputs
        )
        if across is not None:
            alone, used = across.diff(alone, used)
        per_layer[name] = alone.rel_l2
        cost += used
    return per_layer, cost


def _evidence(
    model: nn.Module,
    passes: Passes,
    names: list[str],
    options: AuditOptions,
    progress: ProgressFn | None = None,
) -> tuple[Evidence | None, tuple[str, ...]]:
    """The task metric with stored and cross-fitted recalibrated statistics, when the batches
    carry labels, and the note on what it says; None (with a note saying why, where it would be
    expected) otherwise."""
    calls = list(passes.batches)
    labelled = bool(calls) and all(c.labels is not None for c in calls)
    if not labelled:
        if options.metric is not None:
            return None, (
                "--metric not measured: the batches carry no labels (an integer tensor with one "
                "class per sample beside the input, or a 'label'/'target' key)",
            )
        return None, ()
    metric, name = options.metric, options.metric_name or "metric"
    if metric is None:
        first = passes.outputs[0] if passes.outputs else call_model(model.eval(), calls[0])
        if not applies(first, calls[0].labels):
            return None, (
                "labels found, but the output is not [B, K] class scores for them: pass "
                "--metric module:fn(outputs, labels) -> float to measure the task metric",
            )
        metric, name = top1, TOP1
    if len(calls) < 2:
        return None, (f"{name} not compared: cross-fitting needs at least 2 batches",)
    evidence = measure_evidence(
        model,
        calls,
        passes.layers,
        names,
        passes.outputs,
        regime=options.regime,
        metric=metric,
        metric_name=name,
        progress=progress,
    )
    return evidence, (_evidence_note(evidence, name),)


def _disagree(metrics: dict[str, LayerMetrics], t: Thresholds, passes: Passes) -> bool:
    """A layer is called at several sites, or disagrees with the batches without a local
    pattern that already says why: what the output's confidence is measured to weigh
    (`bnaudit.verdict.staleness`)."""
    shared = {n for n, m in metrics.items() if m.seen.calls > passes.count}
    local = local_disagreements(passes.order, metrics, t, shared)
    return bool(shared) or any(is_stale(m, t) and n not in local for n, m in metrics.items())


def _confidence(
    model: nn.Module,
    passes: Passes,
    names: list[str],
    options: AuditOptions,
    progress: ProgressFn | None = None,
) -> Evidence | None:
    """Without labels, the output's own confidence with stored and cross-fitted recalibrated
    statistics: None when the output is not scores or there are fewer than 2 batches."""
    calls = list(passes.batches)
    if len(calls) < 2:
        return None
    first = passes.outputs[0] if passes.outputs else call_model(model.eval(), calls[0])
    if math.isnan(confidence(first)):
        return None
    return measure_evidence(
        model,
        calls,
        passes.layers,
        names,
        passes.outputs,
        regime=options.regime,
        metric=confidence,
        metric_name=CONFIDENCE,
        progress=progress,
        stage=CONFIDENCE_STAGE,
    )


def _evidence_note(evidence: Evidence, name: str) -> str:
    if evidence.worse:
        return (
            f"recalibrating to these batches lowers {name} beyond noise ({evidence.describe()}): "
            "stale verdicts are relative to these batches, which may not be the training "
            "distribution; do not recalibrate to them (bnaudit recalibrate refuses without "
            "--force)"
        )
    if evidence.better:
        return f"recalibrating raises {name} beyond noise ({evidence.describe()})"
    return f"recalibrating does not change {name} beyond noise ({evidence.describe()})"


def _flagged(m: LayerMetrics, t: Thresholds) -> bool:
    return is_stale(m, t) or has_gap(m, t)
