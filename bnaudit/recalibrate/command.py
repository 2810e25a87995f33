"""`bnaudit recalibrate` as a library call: precise statistics, evidence, a new checkpoint."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnaudit.check.audit import audit
from bnaudit.core.errors import BnauditError
from bnaudit.core.untrusted import clean
from bnaudit.gate.config import CheckSettings
from bnaudit.inputs.calls import parse_input
from bnaudit.inputs.precision import autocast_forward
from bnaudit.measure.progress import ProgressFn, prefixed
from bnaudit.recalibrate.recalibration import Recalibration, apply, recalibrate
from bnaudit.recalibrate.saving import check_output, write_recalibrated
from bnaudit.report.audit_report import AuditReport

if TYPE_CHECKING:
    from bnaudit.distributed import Ranks

from bnaudit.check.run import Prepared, audit_options, device_of, log_line, prepare
from bnaudit.gate.decision import judge


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
    if leader:
        check_output(s.checkpoint, output, force=force)
    if not s.data:
        raise BnauditError("recalibrate needs sample batches from the data: pass --data")
    p = prepare(s, log, ranks)
    if isinstance(p, AuditReport):
        raise BnauditError(f"{s.checkpoint}: recalibrating needs the architecture: pass --model")
    if not verify:  # one pass over the batches: they are streamed, not kept
        r = recalibrate(
            p.model,
            p.batches,
            regime=s.regime.value,
            layers=layers,
            max_batches=s.batches,
            train_mode=s.train_mode.value,
            choice=parse_input(s.input),
            across=ranks,
            progress=progress,
        )
        if leader:
            write_recalibrated(s.checkpoint, output, r, key=s.key)
            log_line(
                log, f"wrote {output} ({len(r.stats)} layers recalibrated on {r.batches} batches)"
            )
        return Recalibrated(None, None, r, output)
    batches = list(itertools.islice(p.batches, s.batches))  # used three times
    options = audit_options(s, p)
    device = device_of(s.device)
    with autocast_forward(p.model, s.autocast, device):
        before = audit(
            p.model,
            batches,
            options=options,
            checkpoint=clean(str(s.checkpoint)),
            sha256=p.checkpoint.sha256,
            ranks=ranks,
            progress=prefixed(progress, "before: "),
        )
    evidence = before.impact.evidence if before.impact else None
    if evidence is not None and evidence.worse and not force:
        raise BnauditError(
            f"{s.checkpoint}: not written: recalibrating to these batches lowers "
            f"{evidence.describe()}. The stored statistics serve the task better than ones fitted "
            "to these batches, which may not be the training distribution; recalibrate on "
            "data drawn like the training data, or pass --force to write anyway"
        )
    with autocast_forward(p.model, s.autocast, device):
        r = recalibrate(
            p.model,
            batches,
            regime=s.regime.value,
            layers=layers,
            train_mode=s.train_mode.value,
            choice=parse_input(s.input),
            across=ranks,
            progress=progress,
        )
    again = dataclasses.replace(s, checkpoint=output)
    if leader:
        write_recalibrated(s.checkpoint, output, r, key=s.key)
        log_line(log, f"wrote {output} ({len(r.stats)} layers recalibrated on {r.batches} batches)")
        q = prepare(again, None)
        assert isinstance(q, Prepared)  # the same architecture as the input
        model, sha256 = q.model, q.checkpoint.sha256
    else:  # the statistics rank 0 wrote, without reading its file (it may be on another node)
        apply(p.model, r)
        model, sha256 = p.model, None
    if ranks is not None:
        ranks.exchange(
            "checkpoint written", None
        )  # the write succeeded, or every rank stops with its error
    with autocast_forward(model, s.autocast, device):
        after = audit(
            model,
            batches,
            options=options,
            checkpoint=clean(str(output)),
            sha256=sha256,
            ranks=ranks,
            progress=prefixed(progress, "after: "),
        )
    return Recalibrated(before, judge(after, again), r, output)
