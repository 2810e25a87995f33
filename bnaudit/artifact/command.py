"""`bnaudit check ARTIFACT --against CKPT --model SPEC --data SPEC` as a library call.

The checkpoint is prepared exactly as `check` prepares it (`bnaudit.check.run.prepare`): loaded
into the model, batches opened. The artifact is opened (`bnaudit.artifact.artifacts`), each BN
layer of the model is found in it and judged (`bnaudit.artifact.places`), then both run in eval
mode on the same batches (`bnaudit.artifact.outputs`). The report is an `AuditReport`, one row
per BN layer of the checkpoint, judged by the gate like any check's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from bnaudit.artifact.artifacts import Artifact, open_artifact
from bnaudit.artifact.outputs import Compared, compare_outputs, output_rtol
from bnaudit.artifact.places import Place, locate
from bnaudit.check.run import Prepared, check_outputs, log_line, prepare
from bnaudit.checkpoint.digest import sha256_file
from bnaudit.core.errors import BnauditError, NothingToAudit
from bnaudit.core.layers import LayerAttrs, find_bn_layers
from bnaudit.core.untrusted import clean
from bnaudit.gate.baseline import read_baseline
from bnaudit.gate.config import CheckSettings, hash_skipped
from bnaudit.gate.decision import judge
from bnaudit.inputs.calls import parse_input
from bnaudit.measure.fold import check_folds
from bnaudit.measure.progress import ProgressFn
from bnaudit.report.audit_report import AuditReport
from bnaudit.verdict.metrics import attributes
from bnaudit.verdict.placement import judge_end_to_end, judge_output
from bnaudit.verdict.results import LayerMetrics, LayerResult, Severity


def run_artifact_check(
    s: CheckSettings, log: Any = None, progress: ProgressFn | None = None, ranks: Any = None
) -> AuditReport:
    """Everything `bnaudit check ARTIFACT --against CKPT` does before rendering."""
    if ranks is not None:
        raise BnauditError("--against runs on one process: run it without torchrun")
    if s.against is None:
        raise BnauditError("an artifact check needs --against CKPT")  # pragma: no cover
    check_outputs(s)
    baseline = read_baseline(s.baseline) if s.baseline and not s.write_baseline else None
    unhashed = hash_skipped(s, os.environ)
    artifact = open_artifact(s.checkpoint, trust=s.trust)
    if s.model is None:
        raise BnauditError(
            f"--against {s.against}: the comparison runs the checkpoint's model: pass --model "
            "(and --data, or --input-shape) as for check"
        )
    if not (s.data or s.input_shape):
        raise BnauditError(
            f"--against {s.against}: the comparison runs both on the same batches: pass --data "
            "(or --input-shape for synthetic ones)"
        )
    against = dataclasses.replace(s, checkpoint=s.against)
    prepared = prepare(against, log, hashed=unhashed is None)
    assert isinstance(prepared, Prepared)  # --model is given: never the static report
    log_line(log, f"checking {s.checkpoint} against {s.against}")
    report = _compare(s, artifact, prepared, progress)
    against = prepared.checkpoint.sha256
    if against is not None:
        checked = f"checkpoint {clean(str(s.against))}: sha256 {against}"
        report = dataclasses.replace(report, notes=(*report.notes, checked))
    sha = sha256_file(s.checkpoint) if unhashed is None else None
    notes = (*artifact.notes, *prepared.checkpoint.notes, *prepared.notes, *report.notes)
    report = dataclasses.replace(report, notes=notes, sha256=sha, sha256_skipped=unhashed)
    return judge(report, s, baseline)


def _compare(
    s: CheckSettings, artifact: Artifact, p: Prepared, progress: ProgressFn | None
) -> AuditReport:
    model = p.model
    layers = find_bn_layers(model)
    if not layers:
        raise NothingToAudit(f"{s.against}: the model has no BatchNorm layer")
    attrs = {name: LayerAttrs.of(m) for name, m in layers}
    batches = iter(p.batches)
    first = next(batches, None)
    if first is None:
        raise BnauditError(f"--data {s.data}: no batch to run")
    choice = parse_input(s.input)
    convs = _fold_partners(model, first)
    places = locate(layers, attrs, convs, artifact)
    exposed = {p.layer: p.tensor for p in places if p.tensor} if artifact.exposes else {}
    runner = artifact.runner(tuple(exposed.values()))
    compared = compare_outputs(
        model,
        runner,
        _chain(first, batches),
        exposed,
        max_batches=s.batches,
        choice=choice,
        progress=progress,
    )
    return _report(s, artifact, places, attrs, compared)


def _fold_partners(model: nn.Module, batch: Any) -> dict[str, tuple[str, nn.Module]]:
    """BN layer → the conv/linear (name, module) that feeds it alone, from one eval forward."""
    pairs, _ = check_folds(model, batch)
    modules = dict(model.named_modules())
    return {p.bn: (p.conv, modules[p.conv]) for p in pairs.pairs}


def _chain(first: Any, rest: Any) -> Any:
    yield first
    yield from rest


def _report(
    s: CheckSettings,
    artifact: Artifact,
    places: list[Place],
    attrs: dict[str, LayerAttrs],
    compared: Compared,
) -> AuditReport:
    tolerance = output_rtol(artifact.dtype)
    results = []
    upstream = ""  # the first layer already wrong: the outputs after it differ because of it
    for place in places:
        a = attrs[place.layer]
        gap = compared.layers.get(place.layer)
        err = gap.rel if gap is not None else float("nan")
        placement = dataclasses.replace(place.placement, output_err=err)
        metrics = dataclasses.replace(_metrics(a), artifact=placement)
        findings = place.findings
        if not upstream:
            findings = (*findings, *judge_output(place.layer, placement, err, tolerance))
            if any(f.severity >= Severity.FAIL for f in findings):
                upstream = place.layer
        results.append(LayerResult(place.layer, a.type_name, metrics, findings))
    e2e = compared.output
    counts: dict[str, int] = {}
    for place in places:
        counts[place.placement.place] = counts.get(place.placement.place, 0) + 1
    top1 = compared.top1
    agree = (
        ""
        if top1 is None
        else f", top-1 agreement {100 * top1:.1f}% (assumes the [B, {compared.width}] output is "
        "class scores)"
    )
    notes = (
        f"artifact check against {clean(str(s.against))}: {compared.batches} batches through "
        f"both in eval mode; end to end max abs {e2e.max_abs:.3g}, relative {e2e.rel:.3g} "
        f"(tolerance {tolerance:g} for {str(artifact.dtype).removeprefix('torch.')}){agree}",
        "BN layers in the artifact: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        "layer outputs compared where the artifact exposes them (ONNX: the node's output as an "
        "extra graph output of a copy in memory)"
        if artifact.exposes
        else "layer outputs not compared: a compiled program's inner tensors are not exposed",
    )
    if upstream and artifact.exposes:
        notes += (
            f"layer outputs after {upstream} (in the model's order) are not judged: they "
            "differ because of it; its artifact_output_err is still reported",
        )
    return AuditReport(
        layers=tuple(results),
        fail_on=s.fail_on,
        batches=compared.batches,
        forward_passes=2 * compared.batches + 1,
        notes=notes,
        checkpoint=clean(str(s.checkpoint)),
        model_findings=judge_end_to_end(e2e.max_abs, e2e.rel, top1, tolerance),
    )


# The batches' statistics are not compared here: the artifact is, with the checkpoint. "n/a" keeps
# the verdict line from reading as if those comparisons had been skipped (`report.summary`).
_NOT_COMPARED = "n/a: artifact check (the artifact against its checkpoint)"


def _metrics(a: LayerAttrs) -> LayerMetrics:
    unmeasured = LayerMetrics.unmeasured(
        "artifact check", stale_judged=_NOT_COMPARED, gap_judged=_NOT_COMPARED
    )
    return dataclasses.replace(unmeasured, attrs=attributes(a))
