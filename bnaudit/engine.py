"""The audit engine: one eval-mode and one train-mode pass per batch, a probe on every BN layer.

Each probe (`bnaudit.measure.probe`) reconstructs the layer's output by hand from the attributes,
checks the running-stat update, reduces the layer's input to per-channel accumulators and drops
every tensor. The model's modes, buffers and momentum are put back in `finally`; the train-mode
update is undone in the hook itself, so every batch is compared against the checkpoint's
statistics. After the passes come the metrics and findings, the fold checks, and with data the
output impact of recalibrated statistics and, with labels, the task metric's evidence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bnaudit.core.errors import DataError, NothingToAudit, describe
from bnaudit.core.layers import (
    Kind,
    counter_notes,
    find_bn_layers,
    preserved,
)
from bnaudit.findings import (
    Thresholds,
    has_gap,
    is_stale,
    judge_layer,
    judge_model,
    weigh_evidence,
)
from bnaudit.inputs.batches import Call, InputChoice, call_model, move_batch, to_call
from bnaudit.inputs.containers import map_tensors, tensors
from bnaudit.measure.dataflow import METHOD, Pairs
from bnaudit.measure.evidence import Metric, applies, top1
from bnaudit.measure.evidence import measure as measure_evidence
from bnaudit.measure.fold import FoldWatch
from bnaudit.measure.grouped import Deferred
from bnaudit.measure.impact import (
    TOP1,
    Across,
    Evidence,
    OutputImpact,
    compare_outputs,
    eval_regime_stats,
    like_buffer,
)
from bnaudit.measure.probe import Probe
from bnaudit.measure.progress import (
    AUDIT,
    ProgressFn,
    Ticking,
    batch_count,
    impact_stage,
    one_stage,
)
from bnaudit.measure.updates import Ledger
from bnaudit.metrics import figures_of, measure
from bnaudit.results import AuditReport, FailOn, LayerResult
from bnaudit.static import NO_BATCH_CODES

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


@dataclass
class Passes:
    """What the audit's own forward passes left behind."""

    probes: list[Probe]
    layers: dict[str, nn.Module]  # every BN-like layer, audited or not
    count: int  # batches run
    batches: Iterable[Any]  # to run again for the output impact (moved to the device)
    outputs: list[Any] | None  # eval-mode outputs with the stored stats; None past the budget
    feed: str = ""  # how the batches feed the model, when they hold more than the input
    order: tuple[str, ...] = ()  # every BN layer that ran, audited or not, in the order it ran


def _set_train_mode(model: nn.Module, layers: list[tuple[str, nn.Module]], mode: str) -> None:
    if mode == "all":
        model.train()
    else:  # after the eval-mode pass: the model is in eval mode already
        for _, m in layers:
            # Not m.train(): a BN subclass's own children (timm's dropout in BatchNormAct2d)
            # stay in eval mode, so the pass stays deterministic.
            m.training = True


def run_passes(
    model: nn.Module,
    batches: Iterable[Any],
    options: AuditOptions,
    progress: Callable[[int], None] | None = None,
    folds: FoldWatch | None = None,
) -> Passes:
    """Run every batch once in eval and once in train mode with all probes attached.

    `progress`, when given, is called with the number of batches done after each batch;
    `folds` watches the first eval-mode pass.
    """
    layers = find_bn_layers(model)
    if not layers:
        raise NothingToAudit(
            "the model has no BatchNorm layer (no torch.nn.modules.batchnorm._BatchNorm)"
        )
    clock = itertools.count()
    wanted = options.layers
    ledger = Ledger()
    deferred = Deferred(ledger.settle)
    probes = [
        Probe(name, m, clock, ledger, wanted is None or name in wanted, deferred)
        for name, m in layers
    ]
    device, dtype = _model_device_dtype(model)
    # Batches that may not come back in the same order (a one-shot iterator, a shuffling
    # DataLoader) are kept for the impact passes, which pair each batch with its eval output.
    keep = (options.impact or options.regime == "eval") and not _replayable(batches)
    feed = ""
    kept: list[Any] = []
    outputs: list[Any] | None = [] if options.impact else None
    budget = options.output_budget_mb * 2**20
    count = 0
    with preserved(model, layers), torch.no_grad():
        handles = [h for p in probes for h in p.hooks()]
        try:
            for batch in batches:
                if options.max_batches is not None and count >= options.max_batches:
                    break
                batch = _as_call(model, move_batch(batch, device, dtype), options.input)
                feed = feed or batch.how
                for regime in ("eval", "train"):
                    for p in probes:
                        p.regime = regime
                    if regime == "train":
                        _set_train_mode(model, layers, options.train_mode)
                    elif options.train_mode == "all" or count == 0:
                        model.eval()
                    else:  # only the BN layers left eval mode: a walk of the model costs more
                        for _, m in layers:
                            m.training = False
                    watch = folds is not None and count == 0 and regime == "eval"
                    with folds.watching() if watch else contextlib.nullcontext():  # type: ignore[union-attr]
                        out = _forward(model, batch, count, regime)
                    ledger.settle()  # the train-mode updates, read and undone
                    deferred.end_pass()
                    if regime == "eval" and outputs is not None:
                        outputs.append(_detached(out))
                        budget -= _nbytes(out)
                        if budget < 0:  # too big to keep: the impact passes recompute them
                            outputs = None
                if keep:
                    kept.append(batch)
                count += 1
                if progress is not None:
                    progress(count)
            deferred.finish()
            for p in probes:
                p.finish()
        finally:
            for h in handles:
                h.remove()
    again = kept if keep else Moved(model, batches, count, options.input)
    ran = sorted((p for p in probes if p.first_call is not None), key=lambda p: p.first_call or 0)
    order = tuple(p.name for p in ran)
    probed = [p for p in probes if p.measure]
    return Passes(probed, dict(layers), count, again, outputs, feed, order)


def _as_call(model: nn.Module, batch: Any, choice: InputChoice) -> Call:
    return batch if isinstance(batch, Call) else to_call(model, batch, choice)


def _replayable(batches: Iterable[Any]) -> bool:
    """Whether iterating `batches` again gives the same batches in the same order: not a
    one-shot iterator, nor a DataLoader that samples anew each time (shuffle=True). Any other
    iterable is taken to replay, as a dataset-backed loader does."""
    if isinstance(batches, Iterator):
        return False
    from torch.utils.data import DataLoader, SequentialSampler

    if isinstance(batches, DataLoader):
        return isinstance(batches.sampler, SequentialSampler)
    return True


class Moved:
    """Iterate `batches` again: the first `count`, each moved to the model's device and dtype."""

    def __init__(
        self, model: nn.Module, batches: Iterable[Any], count: int, choice: InputChoice
    ) -> None:
        self.model, self.batches, self.count, self.choice = model, batches, count, choice
        self.device, self.dtype = _model_device_dtype(model)

    def __iter__(self) -> Iterator[Call]:
        for batch in itertools.islice(self.batches, self.count):
            yield _as_call(self.model, move_batch(batch, self.device, self.dtype), self.choice)


def _detached(out: Any) -> Any:
    return map_tensors(Tensor.detach, out)


def _nbytes(out: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(out))


def _forward(model: nn.Module, batch: Any, index: int, regime: str) -> Any:
    try:
        return call_model(model, batch)
    # AssertionError: forwards check their input shapes with assert (timm's patch embedding).
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        hint = ""
        if "more than 1 value per channel" in str(exc):
            hint = (
                " A BN layer saw a single value per channel in train mode: use batches of at"
                " least 2 samples (--batch-size)."
            )
        raise DataError(
            f"the model's forward failed on batch {index} in {regime} mode: {describe(exc)}.{hint}"
        ) from exc


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    # Lazily: the first floating-point tensor decides, without listing a large model's.
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


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


def recalibrated_stats(
    passes: Passes, regime: str, model: nn.Module, across: Across | None = None
) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
    """Precise statistics per recalibrable layer (see bnaudit.measure.impact for the choice)."""
    train = {
        p.name: (
            like_buffer(p.stats.train.batch_means.mean, p.module.running_mean),
            like_buffer(p.stats.train.batch_vars.mean, p.module.running_var),
        )
        for p in passes.probes
        if p.attrs.kind is not Kind.FROZEN
        and p.attrs.has_running_stats
        and p.stats.train.batch_means.mean is not None
        and p.stats.train.batch_vars.mean is not None
    }
    if regime == "train":
        return train, 0
    start = {
        n: (passes.layers[n].running_mean.clone(), passes.layers[n].running_var.clone())
        for n in train
    }
    # Every level needs one pass; the +1 confirms nothing moves any more.
    return eval_regime_stats(model, passes.batches, passes.layers, start, len(start) + 1, across)


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
