"""A training checkpoint's BN counters against its step count: the findings and notes that
`check` adds to an audit, static or full, when the checkpoint says how far training went."""

from __future__ import annotations

import dataclasses

from bnaudit.checkpoint.training import StepCount
from bnaudit.report.audit_report import AuditReport
from bnaudit.verdict.counters import Expected, bad_step_count, judge_counters


def with_counter_findings(
    report: AuditReport,
    count: StepCount | None,
    *,
    steps_per_epoch: int | None = None,
    accumulate: int = 1,
) -> AuditReport:
    """`report` with the counter findings (`bnaudit.verdict.counters`) added to its layers and
    a note on what the counters were compared with. `count` None: a bare state dict, which
    holds no step count, and is returned as it is."""
    if count is None:
        return report
    expected, notes, model = _expected(count, steps_per_epoch, accumulate)
    counters = {
        layer.name: layer.metrics.attrs.num_batches_tracked
        for layer in report.layers
        if layer.metrics.attrs.kind == "batch"  # InstanceNorm never counts; frozen has none
    }
    found = judge_counters(counters, expected)
    layers = tuple(
        dataclasses.replace(
            layer,
            findings=tuple(
                sorted((*layer.findings, *found[layer.name]), key=lambda f: -f.severity)
            ),
        )
        if layer.name in found
        else layer
        for layer in report.layers
    )
    return dataclasses.replace(
        report,
        layers=layers,
        notes=(*report.notes, *notes),
        model_findings=(*report.model_findings, *model),
    )


def _expected(
    count: StepCount | None, steps_per_epoch: int | None, accumulate: int
) -> tuple[Expected, list[str], list]:
    """What the counters are compared with, the notes that say so, a finding on a bad count."""
    among = Expected(None, "")
    if count is None or not count.found:
        return among, [
            "no training step count in the checkpoint (optimizer state, global_step, step, "
            "iteration, epoch): BN counters compared with each other only"
        ], []  # fmt: skip
    if count.problem:
        return among, [], [bad_step_count(count.source, count.problem)]
    count = count.resolved(steps_per_epoch)
    if count.steps is None:
        return among, [
            f"the checkpoint holds an epoch ({count.epochs}, {count.source}) but no step count: "
            "pass --steps-per-epoch N to compare the BN counters with it"
        ], []  # fmt: skip
    micro = f" x {accumulate} micro-batches (--accumulate)" if accumulate > 1 else ""
    what = f"the {count.steps} optimizer steps{micro}"
    note = (
        f"training step count {count.steps} ({count.source}): every BN counter compared with "
        f"{count.steps * accumulate}"
    )
    if count.steps == 0:
        return among, [f"{note}; no step was taken, so only with each other"], []
    return Expected(count.steps * accumulate, what), [note], []
