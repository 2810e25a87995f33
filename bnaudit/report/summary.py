"""The summary of an audit in lines of text: the verdict line, the facts a report file opens
with, the findings one per line; shared by the terminal output, markdown and the diff reports."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from bnaudit.core.version import __version__
from bnaudit.report.numbers import num, percent, share
from bnaudit.report.record import AuditRecord, Gated, Layer
from bnaudit.report.terminal import paint, printable
from bnaudit.verdict.codes import CODES
from bnaudit.verdict.results import FailOn, Severity, Status, counted
from bnaudit.verdict.thresholds import JUDGED

if TYPE_CHECKING:
    from bnaudit.report.record import BaselineCheck

WORST_SHOWN = 5  # layers named in "worst:" lines, stale baseline entries listed


def summary_line(report: AuditRecord, color: bool = False) -> str:
    """The verdict in one line, last of the table output and all that `--quiet` prints: what
    fails the gate, or which checks ran when not all of them did, then the layer counts."""
    verdict = report.verdict.upper()
    parts = [_gate(report)]
    if report.checks_run is not None and report.failing:  # a failing static audit says it too
        parts.append(_partial(report))
    unjudged = _unjudged(report)
    if unjudged:
        parts.append(unjudged)
    counts = report.counts()
    layers = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    parts.append(f"{counted(len(report.layers), 'BN layer')}: {layers or 'none'}")
    status = report.status_counts()
    accepted = [f"{status[k]} {k}" for k in ("ignored", "baselined") if status[k]]
    if accepted:
        parts.append(", ".join(accepted))
    head = paint(verdict, report.verdict) if color else verdict
    return f"{head}: " + "; ".join(parts)


def _partial(report: AuditRecord) -> str:
    assert report.checks_run is not None
    return (
        f"static checks only, {len(report.checks_run)} of {len(CODES)} checks; pass "
        f"{report.checks_need} for the rest"
    )


# The data-dependent comparisons, and where a layer's judged status is kept.
COMPARISONS = (
    ("stale-stats", lambda m: m.train.drift.judged),
    ("train-eval-gap", lambda m: m.eval.drift.judged),
)


def _unjudged(report: AuditRecord) -> str:
    """With batches, the comparisons judged on fewer layers than they apply to, e.g.
    "stale-stats and train-eval-gap judged on 0 of 2 layers (the notes say why)": a PASS
    must not read as if they had run. "" when they ran wherever they apply."""
    if report.checks_run is not None or not report.batches:
        return ""
    counts: dict[tuple[int, int], list[str]] = {}
    for code, status in COMPARISONS:
        statuses = [status(r.metrics) for r in report.layers]
        applies = [s for s in statuses if not s.startswith("n/a")]
        judged = sum(s == JUDGED for s in applies)
        if judged < len(applies):
            counts.setdefault((judged, len(applies)), []).append(code)
    said = [
        f"{' and '.join(codes)} judged on {judged or 'none'} of {counted(applies, 'layer')}"
        for (judged, applies), codes in counts.items()
    ]
    return "; ".join(said) + " (the notes say why)" if said else ""


def _gate(report: AuditRecord) -> str:
    failing = report.failing
    if failing:
        by_code = Counter(f.code for f in failing)
        what = ", ".join(f"{c} x{n}" if n > 1 else c for c, n in by_code.items())
        many = len(failing) > 1
        return (
            f"{len(failing)} finding{'s' if many else ''} fail{'' if many else 's'} the gate "
            f"({report.fail_on.value} or worse: {what})"
        )
    if report.checks_run is not None:
        return _partial(report)
    if report.fail_on is FailOn.NEVER:
        return "the gate is off (--fail-on never)"
    return f"no finding at {report.fail_on.value} or worse"


def summary_lines(report: AuditRecord, color: bool = False) -> list[str]:
    """Every fact of the summary for a report file, the verdict line last."""
    counts = report.counts()
    lines = [
        f"bnaudit {__version__}: {counted(report.batches, 'batch', 'batches')}, "
        f"{counted(report.forward_passes, 'forward pass', 'forward passes')}; "
        f"gate: --fail-on {report.fail_on.value}",
        "verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
    ]
    if report.checkpoint:
        lines.insert(
            0, f"checkpoint: {printable(report.checkpoint)} (sha256 {sha256_text(report)})"
        )
    lines += worst_lines(report.layers)
    if report.baseline:
        lines += baseline_lines(report, report.baseline)
    lines += impact_lines(report)
    lines += note_lines(report)
    return [*lines, summary_line(report, color)]


def note_lines(report: AuditRecord) -> list[str]:
    """`note: ...` lines: synthetic batches first, then the audit's own notes."""
    synthetic = "note: synthetic N(0,1) batches: data-dependent verdicts are not drawn"
    return ([synthetic] if report.synthetic_data else []) + [
        f"note: {printable(n)}" for n in report.notes
    ]


def worst_lines(layers: Iterable[Layer]) -> list[str]:
    """`worst: NAME (VERDICT: CODES)` for the worst layers at warn or above, worst first."""
    worst = sorted((r for r in layers if r.severity >= Severity.WARN), key=lambda r: -r.severity)
    lines = []
    for r in worst[:WORST_SHOWN]:
        found = ", ".join(
            dict.fromkeys(f.code for f in r.findings if f.counts and f.severity == r.severity)
        )
        lines.append(f"worst: {printable(r.name)} ({r.verdict}: {found})")
    return lines


def baseline_lines(report: AuditRecord, b: BaselineCheck) -> list[str]:
    status = report.status_counts()
    verb = "written to" if b.written else "compared with"
    lines = [
        f"baseline: {verb} {b.path} (margin {percent(b.margin)}%): {status['new']} new, "
        f"{status['worse']} worse, {status['baselined']} baselined, {len(b.stale)} stale"
    ]
    for e in b.stale[:WORST_SHOWN]:
        lines.append(
            f"stale baseline entry: {printable(e.layer)} {printable(e.code)} (no longer found)"
        )
    if len(b.stale) > WORST_SHOWN:
        lines.append(f"stale baseline entries: {len(b.stale) - WORST_SHOWN} more")
    if b.stale:
        lines.append(f"tighten the baseline: rerun with --write-baseline {b.path}")
    return lines


def impact_lines(report: AuditRecord) -> list[str]:
    i = report.impact
    if i is None:
        return []
    top1 = "" if i.top1_agreement is None else f", top-1 agreement {share(i.top1_agreement)}"
    top1 += f" ({i.top1_basis})" if top1 and i.top1_basis else ""
    lines = [
        f"output impact of recalibrating ({i.regime} regime, {i.forward_passes} extra passes): "
        f"rel L2 {num(i.rel_l2)}, max abs {num(i.max_abs)}{top1}"
    ]
    ranked = sorted(i.per_layer.items(), key=lambda kv: -kv[1])
    lines += [f"  {name} alone: rel L2 {num(change)}" for name, change in ranked]
    if i.evidence is not None:
        lines.append(f"  {i.evidence.describe()}")
    return lines


def finding_lines(report: Gated, bullet: str = "") -> list[str]:
    lines = []
    pad = "  " if bullet else ""
    counted = [f for f in report.findings if f.counts]
    for f in sorted(counted, key=lambda f: -f.severity):
        tag = "" if f.status is Status.OPEN else f" [{f.status.value}]"
        lines.append(
            f"{bullet}{f.severity.label.upper():4}  {printable(f.layer)}  {f.code}{tag}: "
            f"{printable(f.message)}"
        )
        if f.status is Status.WORSE:
            lines.append(f"{pad}      worse than the baseline: {printable(f.status_reason)}")
        if f.hint:
            lines.append(f"{pad}      fix: {printable(f.hint)}")
    return lines


def waived_lines(report: Gated, bullet: str = "") -> list[str]:
    lines = []
    pad = "  " if bullet else ""
    waived = [f for f in report.findings if not f.counts]
    for f in sorted(waived, key=lambda f: -f.severity):
        lines.append(
            f"{bullet}{f.severity.label.upper():4}  {printable(f.layer)}  {f.code} "
            f"[{f.status.value}]: {printable(f.message)}"
        )
        lines.append(f"{pad}      {f.status.value}: {printable(f.status_reason)}")
    return lines


def sha256_text(report: AuditRecord, short: bool = False) -> str:
    """The checkpoint's SHA-256 as the reports show it (`short`: 12 digits and "…"), or, where
    it was not computed, why: never an empty string that could pass for a value."""
    if report.sha256 is None:
        return report.sha256_note or "not computed"
    return report.sha256[:12] + "…" if short else report.sha256
