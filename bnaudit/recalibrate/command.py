"""`bnaudit recalibrate` as a library call: precise statistics, evidence, a new checkpoint."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.check.audit import AuditOptions, audit
from bnaudit.check.run import Prepared, audit_options, device_of, log_line, prepare
from bnaudit.core.errors import BnauditError
from bnaudit.core.untrusted import clean
from bnaudit.gate.config import CheckSettings
from bnaudit.gate.decision import judge
from bnaudit.inputs.calls import parse_input
from bnaudit.inputs.precision import autocast_forward
from bnaudit.measure.progress import ProgressFn, prefixed
from bnaudit.recalibrate.recalibration import Recalibration, apply, recalibrate
from bnaudit.recalibrate.saving import check_output, write_recalibrated
from bnaudit.report.audit_report import AuditReport

if TYPE_CHECKING:
    from torch import nn

    from bnaudit.distributed import Ranks


@dataclass(frozen=True)
class Recalibrated:
    before: AuditReport | None  # None without the verifying audits (verify=False)
    after: AuditReport | None
    recalibration: Recalibration
    output: Path


def run_recalibrate(
    s: CheckSettings,
    output: Path,
    *,
    force: bool,
    layers: tuple[str, ...],
    log: Any = None,
    verify: bool = True,
    ranks: Ranks | None = None,
    progress: ProgressFn | None = None,
) -> Recalibrated:
    """Audit, recalibrate on the sample batches, write the new checkpoint, audit it again.

    With labelled batches, a recalibration that lowers the task metric beyond noise (cross-fitted,
    see bnaudit.measure.evidence) is refused unless `force`. `verify=False` skips both audits (and
    with them that refusal): the statistics pass alone, the cost of update_bn. Under torchrun
    (`ranks`) every rank works on its shard, the statistics are merged, and rank 0 writes.
    `progress` ticks every pass: the audits' stages after "before: " and "after: ", and the
    recalibration's (`bnaudit.measure.progress`)."""
    leader = ranks is None or ranks.leader
    p = _prepared(s, output, force=force, log=log, ranks=ranks)
    if not verify:  # one pass over the batches: they are streamed, not kept
        r = _recalibration(p.model, p.batches, s, layers, ranks, progress, max_batches=s.batches)
        if leader:
            _write(s, output, r, log)
        return Recalibrated(None, None, r, output)
    batches = list(itertools.islice(p.batches, s.batches))  # used three times
    options = audit_options(s, p)
    device = device_of(s.device)
    with autocast_forward(p.model, s.autocast, device):
        before = _audit(
            p.model, batches, s, p.checkpoint.sha256, options, ranks, progress, "before: "
        )
    _refuse_worse(s, before, force=force)
    with autocast_forward(p.model, s.autocast, device):
        r = _recalibration(p.model, batches, s, layers, ranks, progress)
    again = dataclasses.replace(s, checkpoint=output)
    w = _written(s, again, p, r, log, ranks)
    with autocast_forward(w.model, s.autocast, device):
        after = _audit(w.model, batches, again, w.sha256, options, ranks, progress, "after: ")
    return Recalibrated(before, judge(after, again), r, output)


def _prepared(
    s: CheckSettings, output: Path, *, force: bool, log: Any, ranks: Ranks | None
) -> Prepared:
    """The model and the batches, once the output may be written and there is data."""
    if ranks is None or ranks.leader:
        check_output(s.checkpoint, output, force=force)
    if not s.data:
        raise BnauditError("recalibrate needs sample batches from the data: pass --data")
    p = prepare(s, log, ranks)
    if isinstance(p, AuditReport):
        raise BnauditError(f"{s.checkpoint}: recalibrating needs the architecture: pass --model")
    return p


def _recalibration(
    model: nn.Module,
    batches: Any,
    s: CheckSettings,
    layers: tuple[str, ...],
    ranks: Ranks | None,
    progress: ProgressFn | None,
    max_batches: int | None = None,
) -> Recalibration:
    return recalibrate(
        model,
        batches,
        regime=s.regime.value,
        layers=layers,
        max_batches=max_batches,
        train_mode=s.train_mode.value,
        choice=parse_input(s.input),
        across=ranks,
        progress=progress,
    )


def _audit(
    model: nn.Module,
    batches: list[Any],
    s: CheckSettings,
    sha256: str | None,
    options: AuditOptions,
    ranks: Ranks | None,
    progress: ProgressFn | None,
    stage: str,
) -> AuditReport:
    """A verifying audit of `s.checkpoint` on `batches`, its passes ticking after `stage`."""
    return audit(
        model,
        batches,
        options=options,
        checkpoint=clean(str(s.checkpoint)),
        sha256=sha256,
        ranks=ranks,
        progress=prefixed(progress, stage),
    )


def _refuse_worse(s: CheckSettings, before: AuditReport, *, force: bool) -> None:
    """Refuse statistics that lower the task metric beyond noise, unless `force`."""
    evidence = before.impact.evidence if before.impact else None
    if evidence is not None and evidence.worse and not force:
        raise BnauditError(
            f"{s.checkpoint}: not written: recalibrating to these batches lowers "
            f"{evidence.describe()}. The stored statistics serve the task better than ones fitted "
            "to these batches, which may not be the training distribution; recalibrate on "
            "data drawn like the training data, or pass --force to write anyway"
        )


def _write(s: CheckSettings, output: Path, r: Recalibration, log: Any) -> None:
    write_recalibrated(s.checkpoint, output, r, key=s.key)
    log_line(log, f"wrote {output} ({len(r.stats)} layers recalibrated on {r.batches} batches)")


@dataclass(frozen=True)
class _Written:
    """The recalibrated model to audit again, and its checkpoint's hash (None: not read)."""

    model: nn.Module
    sha256: str | None


def _written(
    s: CheckSettings,
    again: CheckSettings,
    p: Prepared,
    r: Recalibration,
    log: Any,
    ranks: Ranks | None,
) -> _Written:
    """Rank 0 writes the new checkpoint (`again.checkpoint`) and loads it back; the other ranks
    apply the statistics it wrote, without reading its file (it may be on another node)."""
    if ranks is None or ranks.leader:
        _write(s, again.checkpoint, r, log)
        q = prepare(again, None)
        assert isinstance(q, Prepared)  # the same architecture as the input
        written = _Written(q.model, q.checkpoint.sha256)
    else:
        apply(p.model, r)
        written = _Written(p.model, None)
    if ranks is not None:  # the write succeeded, or every rank stops with its error
        ranks.exchange("checkpoint written", None)
    return written
