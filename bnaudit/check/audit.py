"""The audit: the passes (`bnaudit.measure.passes`), then the metrics, the findings, the fold
checks and the output impact, gathered into one `AuditReport`.

Each probe (`bnaudit.measure.probe`) reconstructs the layer's output by hand from the attributes,
checks the running-stat update, reduces the layer's input to per-channel accumulators and drops
every tensor. The model's modes, buffers and momentum are put back in `finally`; the train-mode
update is undone in the hook itself, so every batch is compared against the checkpoint's
statistics. After the passes come the metrics, the fold checks, with data the output impact of
recalibrated statistics and, with labels, the task metric's evidence (`bnaudit.check.impact`),
then the findings: each a stage that returns its values and its notes, which `audit` joins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from bnaudit.check.impact import output_impact

# AuditOptions is the audit's public companion: `bnaudit.check.audit.AuditOptions` as before.
from bnaudit.check.options import AuditOptions, with_overrides
from bnaudit.check.sites import shared_sites
from bnaudit.check.static import NO_BATCH_CODES
from bnaudit.core.layers import counter_notes, find_bn_layers, other_names
from bnaudit.core.runtime import older_objects_frozen, torch_threads
from bnaudit.measure import fused
from bnaudit.measure.dataflow import METHOD, Pairs
from bnaudit.measure.diversity import diversity
from bnaudit.measure.fold import FoldCheck, FoldWatch
from bnaudit.measure.impact import OutputImpact
from bnaudit.measure.passes import Passes, run_passes
from bnaudit.measure.progress import AUDIT, ProgressFn, batch_count, one_stage
from bnaudit.report.audit_report import AuditReport
from bnaudit.verdict.drift import MIN_EFFECTIVE_VALUES
from bnaudit.verdict.findings import JUDGED, Thresholds, is_stale, judge_layer, judge_model
from bnaudit.verdict.metrics import behind_small_batches, figures_of, measure
from bnaudit.verdict.results import Folding, LayerMetrics, LayerResult, Severity
from bnaudit.verdict.sites import CallSites, judge_sites
from bnaudit.verdict.staleness import (
    StaleEvidence,
    depth_pattern,
    local_disagreements,
    weigh_stale,
)

if TYPE_CHECKING:
    from bnaudit.distributed import Ranks


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
    options = with_overrides(options or AuditOptions(), overrides)
    with older_objects_frozen():
        return _audit(model, batches, options, checkpoint, sha256, progress, ranks)


def _audit(
    model: nn.Module,
    batches: Iterable[Any],
    options: AuditOptions,
    checkpoint: str | None,
    sha256: str | None,
    progress: ProgressFn | None,
    ranks: Ranks | None,
) -> AuditReport:
    ran = _run(model, batches, options, progress, ranks)
    # A model whose BN calls are all small: its passes after the first ran on one torch thread,
    # and so do the rest (`bnaudit.measure.passes.SMALL_CALL_VALUES` says why).
    with torch_threads(1) if ran.passes.small else contextlib.nullcontext():
        metrics = _metrics(ran.passes, options)
        folds = _fold_checks(ran.folds, ran.passes)
        impact = output_impact(model, ran.passes, metrics, options, ranks, progress)
        joined = _joined(metrics, folds.checks, impact.impact)
        sites = shared_sites(model, ran.passes, metrics, options, ranks)
        judged = _judged(ran.passes, joined, impact.impact, options.thresholds, sites)
    sample = _sample_note(ran.passes, judged.layers, options)
    notes = (*ran.notes, *folds.notes, *impact.notes, *judged.notes, *sample)
    return _report(
        ran.passes.count, judged.layers, impact.impact, notes, options, checkpoint, sha256
    )


# -- the stages, in the order `audit` runs them -------------------------------------------------


@dataclass(frozen=True)
class _Ran:
    """The passes (merged across ranks), the fold watch that saw the first batch, and what the
    passes have to say about the batches and the layers."""

    passes: Passes
    folds: FoldWatch | None
    notes: tuple[str, ...]


def _run(
    model: nn.Module,
    batches: Iterable[Any],
    options: AuditOptions,
    progress: ProgressFn | None,
    ranks: Ranks | None,
) -> _Ran:
    folds = None
    # The fold check reads the first batch, which is rank 0's.
    if options.fold and (ranks is None or ranks.leader):
        find_bn_layers(model)  # refuses an unmaterialised model before tracing touches it
        folds = FoldWatch(model)
    per_batch = one_stage(progress, batch_count(batches, options.max_batches), AUDIT)
    passes = run_passes(model, batches, options, per_batch, folds)
    if ranks is not None:
        passes = ranks.merge_passes(passes)
    feed = (f"batches feed the model as {passes.feed} (--input to choose)",) if passes.feed else ()
    counters = counter_notes(
        {p.name: p.attrs.counter_dtype for p in passes.probes},
        "; the model holds it so (Module.type() converts every tensor, the counter included), "
        "read as the count it holds",
    )
    shared = tuple(
        f"{first} is also registered as {', '.join(others)}: one module under "
        f"{len(others) + 1} names, audited once, as {first}"
        for first, others in other_names(model).items()
    )
    return _Ran(passes, folds, (*feed, *counters, *shared, *_torch_path(passes)))


def _torch_path(passes: Passes) -> tuple[str, ...]:
    """The note that CPU layers were measured on the torch path (numba missing or turned off):
    the same numbers, slower, so the report says which path ran and how to get the fast one."""
    on_cpu = passes.count > 0 and any(
        t.device.type == "cpu"
        for p in passes.probes
        for t in itertools.chain(p.module.parameters(False), p.module.buffers(False))
    )
    note = fused.unavailable() if on_cpu else None
    return (note,) if note else ()


def _metrics(passes: Passes, options: AuditOptions) -> dict[str, LayerMetrics]:
    """Every probed layer's numbers, before the fold checks and the output impact join them."""
    t, probes = options.thresholds, passes.probes
    figured = figures_of(
        [(p.attrs, p.stats) for p in probes], t, options.regime, options.synthetic_data
    )
    measured = {
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
    if options.regime != "train":  # eval-mode batches normalise with running statistics
        return measured
    return behind_small_batches(passes.order, measured, t)


@dataclass(frozen=True)
class _Folds:
    """Per paired BN layer its fold check; notes on the pairing and the checks that failed."""

    checks: dict[str, FoldCheck] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _fold_checks(folds: FoldWatch | None, passes: Passes) -> _Folds:
    if folds is None or not passes.count:
        return _Folds()
    pairing = _fold_note(folds.pairs(), len(passes.layers))
    failed = (f"fold check of {bn} not run: {why}" for bn, why in folds.failed().items())
    return _Folds(folds.results(), (pairing, *failed))


def _joined(
    metrics: dict[str, LayerMetrics],
    checks: dict[str, FoldCheck],
    impact: OutputImpact | None,
) -> dict[str, LayerMetrics]:
    """The metrics with each layer's fold check and output change alone, where measured."""
    alone = impact.per_layer if impact else {}
    joined = {}
    for name, m in metrics.items():
        changes: dict[str, Any] = {}
        c = checks.get(name)
        if c is not None:
            changes["fold"] = Folding(
                c.conv, c.checked, c.max_err, c.ratio, c.weight_max, c.int8_levels
            )
        if name in alone:
            changes["output_change_alone"] = alone[name]
        joined[name] = dataclasses.replace(m, **changes) if changes else m
    return joined


@dataclass(frozen=True)
class _Judged:
    """Each layer's findings, and the note when the first layers to run are already stale."""

    layers: tuple[LayerResult, ...]
    notes: tuple[str, ...]


def _judged(
    passes: Passes,
    metrics: dict[str, LayerMetrics],
    impact: OutputImpact | None,
    t: Thresholds,
    sites: dict[str, CallSites],
) -> _Judged:
    # Layers in the order they run, for "a consequence of stale stats upstream".
    order = passes.order
    position = {name: i for i, name in enumerate(order)}
    stale = [n for n in order if n in metrics and n not in sites and is_stale(metrics[n], t)]
    evidence = StaleEvidence(
        labels=impact.evidence if impact else None,
        confidence=impact.confidence if impact else None,
        output_change=impact.rel_l2 if impact else math.nan,
        pattern=depth_pattern(order, metrics, t),
    )
    local = local_disagreements(order, metrics, t, set(sites))
    # Never-updated stats (init-stats) explain their own disagreement: not the data's.
    first = tuple(n for n in _first_stale(order, set(stale)) if not metrics[n].stored.initial_stats)
    notes = ()
    if first:
        notes = (
            f"the first BN layer(s) to run already disagree with the data ({', '.join(first)}): "
            "the audit data may not be the training distribution (preprocessing, "
            "normalisation, domain); recalibrating to it changes the model",
        )
    results = []
    for p in passes.probes:
        here = position.get(p.name)
        upstream = tuple(n for n in stale if here is not None and position[n] < here)
        findings = judge_layer(
            p.name,
            metrics[p.name],
            t,
            type_name=p.attrs.type_name,
            overrides_forward=p.attrs.overrides_forward,
            batches=passes.count,
            upstream_stale=upstream,
            runs_first=p.name in first,
        )
        findings = weigh_stale(findings, evidence, local.get(p.name, ""))
        if p.name in sites:
            findings = judge_sites(p.name, findings, sites[p.name], t, evidence)
        results.append(LayerResult(p.name, p.attrs.type_name, metrics[p.name], findings))
    return _Judged(tuple(results), notes)


def _sample_note(
    passes: Passes, layers: tuple[LayerResult, ...], options: AuditOptions
) -> tuple[str, ...]:
    """Whether the sample is small or of low diversity (`bnaudit.measure.diversity`), said
    when a layer disagrees with it and no evidence says the statistics are stale."""
    unproven = any(
        f.code in ("stale-stats", "shared-bn") and Severity.INFO < f.severity < Severity.FAIL
        for r in layers
        for f in r.findings
    )
    if options.synthetic_data or not unproven:
        return ()
    note = diversity(passes.batches).note()
    return (note,) if note else ()


def _report(
    count: int,
    layers: tuple[LayerResult, ...],
    impact: OutputImpact | None,
    notes: tuple[str, ...],
    options: AuditOptions,
    checkpoint: str | None,
    sha256: str | None,
) -> AuditReport:
    t = options.thresholds
    return AuditReport(
        layers=layers,
        fail_on=options.fail_on,
        batches=count,
        forward_passes=2 * count + (impact.forward_passes if impact else 0),
        synthetic_data=options.synthetic_data,
        notes=(*notes, *_notes(layers, count, t.min_batch)),
        checkpoint=checkpoint,
        sha256=sha256,
        thresholds=dataclasses.asdict(t),
        impact=impact,
        model_findings=judge_model(impact, t),
        checks_run=None if count else NO_BATCH_CODES,
        checks_need="" if count else "--data or --input-shape",
    )


def _first_stale(order: tuple[str, ...], stale: set[str]) -> tuple[str, ...]:
    """The stale layers that run before any layer that is not stale (or not audited).

    Only the input and the weights before it reach the first BN layer to run, in either mode:
    when it already disagrees with the data, the data may be what differs from training.
    """
    return tuple(itertools.takewhile(lambda name: name in stale, order))


def _fold_note(pairs: Pairs, layers: int) -> str:
    note = f"fold pairs by {METHOD}: {len(pairs.pairs)} of {layers} BN layers"
    note += f" ({pairs.note})" if pairs.note else ""
    if pairs.skipped:
        shown = "; ".join(f"{bn}: {why}" for bn, why in pairs.skipped[:3])
        more = len(pairs.skipped) - 3
        note += f"; not paired: {shown}" + (f"; and {more} more" if more > 0 else "")
    return note


def _notes(results: tuple[LayerResult, ...], batches: int, min_batch: int) -> tuple[str, ...]:
    """Why some verdicts were not drawn, once per reason, with the layers it applies to; and
    where batches below `min_batch` were judged, on what grounds."""
    reasons: dict[str, list[str]] = {}
    for r in results:
        for label, status in (
            ("stale-stats", r.metrics.train.drift.judged),
            ("train-eval-gap", r.metrics.eval.drift.judged),
        ):
            if status.startswith("no") and status != "no: synthetic data":  # said once
                reasons.setdefault(f"{label} not judged ({_reason(status)})", []).append(r.name)
            elif status == JUDGED and 0 < r.metrics.seen.batch_size < min_batch:
                size = r.metrics.seen.batch_size
                reasons.setdefault(
                    f"{label} judged at batch size {size} < {min_batch}, since each batch is "
                    f"worth {MIN_EFFECTIVE_VALUES}+ independent values per channel there and "
                    "upstream",
                    [],
                ).append(r.name)
    notes = []
    for reason, names in reasons.items():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        notes.append(f"{reason}: {shown}")
    if batches == 0:
        notes.insert(0, "no batch was run: only the static checks ran")
    return tuple(notes)


def _reason(status: str) -> str:
    """A judged status as a note groups it: small batches once, whatever each layer's count."""
    reason = status.removeprefix("no: ")
    if "effective values" in reason:  # each layer's own count is in its `judged` field
        size = reason.split(" and ")[0]
        return f"{size}, and too few independent values per channel in a batch, here or upstream"
    return reason
