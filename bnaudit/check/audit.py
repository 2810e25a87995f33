"""The audit: the passes (`bnaudit.measure.passes`), then the metrics, the findings, the fold
checks and the output impact, gathered into one `AuditReport`.

Each probe (`bnaudit.measure.probe`) reconstructs the layer's output by hand from the attributes,
checks the running-stat update, reduces the layer's input to per-channel accumulators and drops
every tensor. The model's modes, buffers and momentum are put back in `finally`; the train-mode
update is undone in the hook itself, so every batch is compared against the checkpoint's
statistics. After the passes come the metrics and findings, the fold checks, and with data the
output impact of recalibrated statistics and, with labels, the task metric's evidence.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bnaudit.check.static import NO_BATCH_CODES
from bnaudit.core.errors import DataError, describe
from bnaudit.core.layers import (
    counter_notes,
    find_bn_layers,
    preserved,
)
from bnaudit.inputs.batches import InputChoice, call_model
from bnaudit.measure.dataflow import METHOD, Pairs
from bnaudit.measure.evidence import Metric, applies, top1
from bnaudit.measure.evidence import measure as measure_evidence
from bnaudit.measure.fold import FoldWatch
from bnaudit.measure.impact import (
    TOP1,
    Across,
    Evidence,
    OutputImpact,
    compare_outputs,
)
from bnaudit.measure.passes import Passes, recalibrated_stats, run_passes
from bnaudit.measure.progress import (
    AUDIT,
    ProgressFn,
    Ticking,
    batch_count,
    impact_stage,
    one_stage,
)
from bnaudit.report.audit_report import AuditReport
from bnaudit.verdict.findings import (
    Thresholds,
    has_gap,
    is_stale,
    judge_layer,
    judge_model,
    weigh_evidence,
)
from bnaudit.verdict.metrics import figures_of, measure
from bnaudit.verdict.results import FailOn, LayerResult

if TYPE_CHECKING:
    from bnaudit.distributed import Ranks


@dataclass(frozen=True)
class AuditOptions:
    """How to run the passes and judge them. Thresholds live in `Thresholds`."""

    thresholds: Thresholds = dataclasses.field(default_factory=Thresholds)
    train_mode: str = "bn"  # "bn": only BN layers in train mode; "all": the whole model
    fail_on: FailOn = FailOn.FAIL
    max_batches: int | None = None
    synthetic_data: bool = False
    layers: tuple[str, ...] | None = None  # audit only these (qualified names); None: all
    impact: bool = True  # measure the output effect of recalibrated statistics (with data)
    regime: str = "train"  # recalibrate from train-mode ("train") or eval-mode ("eval") inputs
    attribution: bool = False  # also swap in one flagged layer's statistics at a time
    attribution_max: int = 8  # at most this many layers (K passes each), the worst first
    output_budget_mb: float = 64.0  # eval outputs kept for reuse; beyond, they are recomputed
    fold: bool = True  # check conv/linear → BN folds (on the first eval pass's first samples)
    input: InputChoice = None  # which element or key of a batch is the input (batches.to_call)
    # The task metric, fn(outputs, labels) -> float (higher is better), for batches with labels;
    # None: top-1 accuracy where the outputs are [B, K] class scores.
    metric: Metric | None = None
    metric_name: str = ""


def audit(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    options: AuditOptions | None = None,
    checkpoint: str | None = None,
    sha256: str | None = None,
    progress: ProgressFn | None = None,
    ranks: Ranks | None = None,
    **overrides: Any,
) -> AuditReport:
    """Audit every BN layer of `model` on `batches`; the model is left exactly as it was.

    Args:
        model: any nn.Module with BatchNorm layers, on the device the batches should run on.
        batches: an iterable of batches: tensors, tuples/lists/NamedTuples, dicts, fed to the
            model as `bnaudit.inputs.batches.to_call` says (`input` chooses the element or key);
            labels beside the input make the task metric evidence (`bnaudit.measure.evidence`).
        options: how to run and judge; keyword overrides take `AuditOptions` fields
            (train_mode, fail_on, max_batches, synthetic_data) or `Thresholds` fields.
        progress: called after each batch of every pass with the batches done in the pass,
            their number (None when unknown) and the pass's stage: "audit", "output impact,
            pass K", "task metric, ..." (`bnaudit.measure.progress`).
        ranks: under torchrun, this rank's place: `batches` are its shard, and what every
            rank measured is merged before judging (`bnaudit.distributed`).
    """
    options = _with_overrides(options or AuditOptions(), overrides)
    t = options.thresholds
    notes: list[str] = []
    folds = None
    # The fold check reads the first batch, which is rank 0's.
    if options.fold and (ranks is None or ranks.leader):
        find_bn_layers(model)  # refuses an unmaterialised model before tracing touches it
        folds = FoldWatch(model)
    per_batch = one_stage(progress, batch_count(batches, options.max_batches), AUDIT)
    passes = run_passes(model, batches, options, per_batch, folds)
    if ranks is not None:
        passes = ranks.merge_passes(passes)
    probes, count = passes.probes, passes.count
    if passes.feed:
        notes.append(f"batches feed the model as {passes.feed} (--input to choose)")
    notes += counter_notes(
        {p.name: p.attrs.counter_dtype for p in probes},
        "; the model holds it so (Module.type() converts every tensor, the counter included), "
        "read as the count it holds",
    )
    figured = figures_of(
        [(p.attrs, p.stats) for p in probes], t, options.regime, options.synthetic_data
    )
    metrics = {
        p.name: measure(
            p.attrs,
            p.stats,
            t,
            nonfinite_inputs=p.nonfinite_inputs,
            nonfinite_outputs=p.nonfinite_outputs,
            synthetic=options.synthetic_data,
            train_diagnosis=p.diagnosis["train"],
            eval_diagnosis=p.diagnosis["eval"],
            regime=options.regime,
            measured_at=p.measured_at,
            figured=f,
        )
        for p, f in zip(probes, figured, strict=True)
    }
    if folds is not None and count:
        notes.append(_fold_note(folds.pairs(), len(passes.layers)))
        notes.extend(f"fold check of {bn} not run: {why}" for bn, why in folds.failed().items())
        for name, c in folds.results().items():
            if name in metrics:
                metrics[name] = dataclasses.replace(
                    metrics[name],
                    fold_with=c.conv,
                    fold_checked=c.checked,
                    fold_max_err=c.max_err,
                    fold_ratio=c.ratio,
                    folded_weight_max=c.weight_max,
                    fold_int8_levels=c.int8_levels,
                )
    impact = None
    if options.impact and count and not options.synthetic_data:
        try:
            impact = _impact(model, passes, metrics, options, notes, ranks, progress)
        except (RuntimeError, ValueError, TypeError) as exc:
            if ranks is not None:  # the other ranks wait for this one's comparison: stop them
                raise DataError(f"output impact: the forward failed ({describe(exc)})") from exc
            # e.g. quantization observers fed the stored non-finite statistics
            notes.append(f"output impact not measured: the forward failed ({describe(exc)})")
    for name, change in impact.per_layer.items() if impact else ():
        metrics[name] = dataclasses.replace(metrics[name], output_change_alone=change)
    # Layers in the order they run, for "a consequence of stale stats upstream".
    position = {name: i for i, name in enumerate(passes.order)}
    stale = [n for n in passes.order if n in metrics and is_stale(metrics[n], t)]
    first = _first_stale(passes.order, set(stale))
    if first:
        notes.append(
            f"the first BN layer(s) to run already disagree with the data ({', '.join(first)}): "
            "the audit data may not be the training distribution (preprocessing, "
            "normalisation, domain); recalibrating to it changes the model"
        )
    results = []
    for p in probes:
        here = position.get(p.name)
        upstream = tuple(n for n in stale if here is not None and position[n] < here)
        findings = judge_layer(
            p.name,
            metrics[p.name],
            t,
            type_name=p.attrs.type_name,
            overrides_forward=p.attrs.overrides_forward,
            batches=count,
            upstream_stale=upstream,
            runs_first=p.name in first,
        )
        findings = weigh_evidence(findings, impact.evidence if impact else None)
        results.append(LayerResult(p.name, p.attrs.type_name, metrics[p.name], findings))
    return AuditReport(
        layers=tuple(results),
        fail_on=options.fail_on,
        batches=count,
        forward_passes=2 * count + (impact.forward_passes if impact else 0),
        synthetic_data=options.synthetic_data,
        notes=(*notes, *_notes(results, count)),
        checkpoint=checkpoint,
        sha256=sha256,
        thresholds=dataclasses.asdict(t),
        impact=impact,
        model_findings=judge_model(impact, t),
        checks_run=None if count else NO_BATCH_CODES,
        checks_need="" if count else "--data or --input-shape",
    )


def _impact(
    model: nn.Module,
    passes: Passes,
    metrics: dict,
    options: AuditOptions,
    notes: list[str],
    across: Across | None = None,
    progress: ProgressFn | None = None,
) -> OutputImpact:
    """The output change from recalibrated statistics, and with labels the task metric's;
    what it cannot measure, and what the metric says, goes to `notes`."""
    t = options.thresholds
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
        per_layer: dict[str, float] = {}
        if options.attribution:
            flagged = sorted(
                (n for n, m in metrics.items() if n in stats and _flagged(m, t)),
                key=lambda n: -max(metrics[n].stale_fraction, metrics[n].gap_fraction),
            )[: options.attribution_max]
            for name in flagged:
                alone, used = compare_outputs(
                    model, passes.batches, passes.layers, {name: stats[name]}, passes.outputs
                )
                if across is not None:
                    alone, used = across.diff(alone, used)
                per_layer[name] = alone.rel_l2
                cost += used
        if across is None:
            evidence = _evidence(model, plain, list(stats), options, notes, progress)
        else:  # cross-fitting pairs batches, which the ranks split between them
            evidence = None
            if options.metric is not None or any(c.labels is not None for c in plain.batches):
                notes.append("task-metric evidence not measured: not supported under torchrun")
        cost += evidence.forward_passes if evidence else 0
    return OutputImpact(
        regime=options.regime,
        batches=passes.count,
        forward_passes=cost,
        rel_l2=diff.rel_l2,
        max_abs=diff.max_abs,
        top1_agreement=diff.top1,
        per_layer=per_layer,
        evidence=evidence,
    )


def _evidence(
    model: nn.Module,
    passes: Passes,
    names: list[str],
    options: AuditOptions,
    notes: list[str],
    progress: ProgressFn | None = None,
) -> Evidence | None:
    """The task metric with stored and cross-fitted recalibrated statistics, when the batches
    carry labels; None (with a note saying why, where it would be expected) otherwise."""
    calls = list(passes.batches)
    labelled = bool(calls) and all(c.labels is not None for c in calls)
    if not labelled:
        if options.metric is not None:
            notes.append(
                "--metric not measured: the batches carry no labels (an integer tensor with one "
                "class per sample beside the input, or a 'label'/'target' key)"
            )
        return None
    metric, name = options.metric, options.metric_name or "metric"
    if metric is None:
        first = passes.outputs[0] if passes.outputs else call_model(model.eval(), calls[0])
        if not applies(first, calls[0].labels):
            notes.append(
                "labels found, but the output is not [B, K] class scores for them: pass "
                "--metric module:fn(outputs, labels) -> float to measure the task metric"
            )
            return None
        metric, name = top1, TOP1
    if len(calls) < 2:
        notes.append(f"{name} not compared: cross-fitting needs at least 2 batches")
        return None
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
    if evidence.worse:
        notes.append(
            f"recalibrating to these batches lowers {name} beyond noise ({evidence.describe()}): "
            "stale verdicts are relative to these batches, which may not be the training "
            "distribution; do not recalibrate to them (bnaudit recalibrate refuses without "
            "--force)"
        )
    elif evidence.better:
        notes.append(f"recalibrating raises {name} beyond noise ({evidence.describe()})")
    else:
        notes.append(f"recalibrating does not change {name} beyond noise ({evidence.describe()})")
    return evidence


def _flagged(m, t: Thresholds) -> bool:
    return is_stale(m, t) or has_gap(m, t)


def _first_stale(order: tuple[str, ...], stale: set[str]) -> tuple[str, ...]:
    """The stale layers that run before any layer that is not stale (or not audited).

    Only the input and the weights before it reach the first BN layer to run, in either mode:
    when it already disagrees with the data, the data may be what differs from training.
    """
    return tuple(itertools.takewhile(lambda name: name in stale, order))


def _with_overrides(options: AuditOptions, overrides: dict[str, Any]) -> AuditOptions:
    own = {f.name for f in dataclasses.fields(AuditOptions)} - {"thresholds"}
    mine = {k: v for k, v in overrides.items() if k in own}
    if "fail_on" in mine:
        mine["fail_on"] = FailOn(mine["fail_on"])
    rest = {k: v for k, v in overrides.items() if k not in own}
    thresholds = options.thresholds.replace(**rest) if rest else options.thresholds
    return dataclasses.replace(options, thresholds=thresholds, **mine)


def _fold_note(pairs: Pairs, layers: int) -> str:
    note = f"fold pairs by {METHOD}: {len(pairs.pairs)} of {layers} BN layers"
    note += f" ({pairs.note})" if pairs.note else ""
    if pairs.skipped:
        shown = "; ".join(f"{bn}: {why}" for bn, why in pairs.skipped[:3])
        more = len(pairs.skipped) - 3
        note += f"; not paired: {shown}" + (f"; and {more} more" if more > 0 else "")
    return note


def _notes(results: list[LayerResult], batches: int) -> tuple[str, ...]:
    """Why some verdicts were not drawn, once per reason, with the layers it applies to."""
    reasons: dict[str, list[str]] = {}
    for r in results:
        for label, status in (
            ("stale-stats", r.metrics.stale_judged),
            ("train-eval-gap", r.metrics.gap_judged),
        ):
            if status.startswith("no") and status != "no: synthetic data":  # said once
                reasons.setdefault(
                    f"{label} not judged ({status.removeprefix('no: ')})", []
                ).append(r.name)
    notes = []
    for reason, names in reasons.items():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        notes.append(f"{reason}: {shown}")
    if batches == 0:
        notes.insert(0, "no batch was run: only the static checks ran")
    return tuple(notes)
