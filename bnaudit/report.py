"""Rendering an AuditReport: terminal table, markdown, CSV, JSON; atomic report files."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from bnaudit import __version__, writing
from bnaudit.results import AuditReport, Finding, LayerResult, Severity, Status, finite_or_none
from bnaudit.terminal import paint

if TYPE_CHECKING:
    from bnaudit.baseline import BaselineCheck


class Format(str, enum.Enum):
    TABLE = "table"
    MARKDOWN = "markdown"
    CSV = "csv"
    JSON = "json"


_HEADERS = [
    "layer",
    "type",
    "C",
    "N",
    "verdict",
    "train err",
    "eval err",
    "shift",
    "ln var",
    "gap",
    "momentum",
    "T",
    "findings",
]
_WORST_SHOWN = 5
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Untrusted text (layer names come from the checkpoint) for a terminal or a table:
    control characters, line breaks and escape sequences included, become visible `\\xNN`."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _num(v: float | int | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}"


def _codes(r: LayerResult) -> str:
    """The layer's codes: those that count, then waived ones marked with their status."""
    counted = sorted({f.code for f in r.findings if f.counts})
    waived = sorted({f"{f.code}({f.status.value})" for f in r.waived})
    return " ".join(counted + waived)


def _row(r: LayerResult, color: bool = False) -> list[str]:
    m = r.metrics
    judged = m.stale_judged == "yes"
    return [
        printable(r.name),
        printable(r.type),
        str(m.channels),
        _num(m.values_per_channel or None),
        paint(r.verdict, r.verdict) if color else r.verdict,
        _num(m.recon_train_ratio, 2),
        _num(m.recon_eval_ratio, 2),
        _num(m.stale_shift_max, 2) if judged else "-",
        _num(m.stale_log_var_max, 2) if judged else "-",
        _num(m.gap_fraction, 2) if m.gap_judged == "yes" else "-",
        "cumul." if m.momentum is None else _num(m.momentum),
        _num(m.num_batches_tracked),
        _codes(r),
    ]


def summary_line(report: AuditReport, color: bool = False) -> str:
    """The one-line verdict (all that `--quiet` prints)."""
    verdict = report.verdict.upper()
    status = report.status_counts()
    accepted = [f"{status[k]} {k}" for k in ("ignored", "baselined") if status[k]]
    return (
        f"bnaudit {__version__}: {len(report.layers)} BatchNorm layers, {report.batches} "
        f"batches ({report.forward_passes} forward passes): "
        f"{paint(verdict, report.verdict) if color else verdict}"
        f" (fail on: {report.fail_on.value})" + (f"; {', '.join(accepted)}" if accepted else "")
    )


def summary_text(report: AuditReport, color: bool = False) -> str:
    """The summary under the terminal table: verdict, counts, worst layers, notes."""
    return "\n".join(_summary_lines(report, color)) + "\n"


def _summary_lines(report: AuditReport, color: bool = False) -> list[str]:
    counts = report.counts()
    lines = [
        summary_line(report, color),
        "verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
    ]
    if report.checkpoint:
        lines.insert(1, f"checkpoint: {printable(report.checkpoint)} (sha256 {report.sha256})")
    worst = sorted(
        (r for r in report.layers if r.severity >= Severity.WARN), key=lambda r: -r.severity
    )[:_WORST_SHOWN]
    for r in worst:
        codes = ", ".join(
            dict.fromkeys(f.code for f in r.findings if f.counts and f.severity == r.severity)
        )
        lines.append(f"worst: {printable(r.name)} ({r.verdict}: {codes})")
    if report.baseline:
        lines += _baseline_lines(report, report.baseline)
    lines += _impact_lines(report)
    if report.synthetic_data:
        lines.append("note: synthetic N(0,1) batches: data-dependent verdicts are not drawn")
    lines += [f"note: {printable(n)}" for n in report.notes]
    return lines


def _baseline_lines(report: AuditReport, b: BaselineCheck) -> list[str]:
    status = report.status_counts()
    verb = "written to" if b.written else "compared with"
    lines = [
        f"baseline: {verb} {b.path} (margin {100 * b.margin:.3g}%): {status['new']} new, "
        f"{status['worse']} worse, {status['baselined']} baselined, {len(b.stale)} stale"
    ]
    for e in b.stale[:_WORST_SHOWN]:
        lines.append(
            f"stale baseline entry: {printable(e.layer)} {printable(e.code)} (no longer found)"
        )
    if len(b.stale) > _WORST_SHOWN:
        lines.append(f"stale baseline entries: {len(b.stale) - _WORST_SHOWN} more")
    if b.stale:
        lines.append(f"tighten the baseline: rerun with --write-baseline {b.path}")
    return lines


def _impact_lines(report: AuditReport) -> list[str]:
    i = report.impact
    if i is None:
        return []
    top1 = "" if i.top1_agreement is None else f", top-1 agreement {100 * i.top1_agreement:.1f}%"
    lines = [
        f"output impact of recalibrating ({i.regime} regime, {i.forward_passes} extra passes): "
        f"rel L2 {_num(i.rel_l2)}, max abs {_num(i.max_abs)}{top1}"
    ]
    ranked = sorted(i.per_layer.items(), key=lambda kv: -kv[1])
    lines += [f"  {name} alone: rel L2 {_num(change)}" for name, change in ranked]
    if i.evidence is not None:
        lines.append(f"  {i.evidence.describe()}")
    return lines


def _finding_lines(report: AuditReport, bullet: str = "") -> list[str]:
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


def _waived_lines(report: AuditReport, bullet: str = "") -> list[str]:
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


def render_table(report: AuditReport, color: bool = False) -> str:
    table = tabulate(
        [_row(r, color) for r in report.layers],
        headers=_HEADERS,
        tablefmt="simple",
        disable_numparse=True,
    )
    parts = [table, "", *_summary_lines(report, color)]
    findings = _finding_lines(report)
    if findings:
        parts += ["", "findings:", *findings]
    waived = _waived_lines(report)
    if waived:
        parts += ["", "accepted (ignored or baselined; they do not fail the gate):", *waived]
    return "\n".join(parts) + "\n"


def render_markdown(report: AuditReport) -> str:
    table = tabulate(
        [_row(r) for r in report.layers], headers=_HEADERS, tablefmt="github", disable_numparse=True
    )
    summary = _summary_lines(report)
    parts = [
        f"# bnaudit report: {report.verdict.upper()}",
        "",
        *[f"- {s}" for s in summary[1:]],
        "",
        table,
    ]
    findings = _finding_lines(report, bullet="- ")
    parts += ["", "## Findings", "", *(findings or ["None."])]
    waived = _waived_lines(report, bullet="- ")
    if waived:
        parts += ["", "## Accepted findings", "", *waived]
    return "\n".join(parts) + "\n"


def render_csv(report: AuditReport) -> str:
    return report.to_frame().to_csv(index=False)


def report_dict(report: AuditReport) -> dict[str, Any]:
    return _finite(
        {
            "bnaudit_version": __version__,
            "checkpoint": report.checkpoint,
            "sha256": report.sha256,
            "summary": {
                "verdict": report.verdict,
                "fail_on": report.fail_on.value,
                "layers": len(report.layers),
                "counts": report.counts(),
                "findings": report.status_counts(),
                "batches": report.batches,
                "forward_passes": report.forward_passes,
                "synthetic_data": report.synthetic_data,
                "notes": list(report.notes),
                "impact": dataclasses.asdict(report.impact) if report.impact else None,
                "model_findings": [_finding_dict(f) for f in report.model_findings],
            },
            "baseline": _baseline_dict(report),
            "thresholds": report.thresholds,
            "layers": [
                {
                    "name": r.name,
                    "type": r.type,
                    "verdict": r.verdict,
                    "metrics": dataclasses.asdict(r.metrics),
                    "findings": [_finding_dict(f) for f in r.findings],
                }
                for r in report.layers
            ],
        }
    )


def _finding_dict(f: Finding) -> dict[str, Any]:
    return {
        "code": f.code,
        "severity": f.severity.label,
        "message": f.message,
        "hint": f.hint,
        "value": f.value,
        "threshold": f.threshold,
        "status": f.status.value,
        "status_reason": f.status_reason,
    }


def _baseline_dict(report: AuditReport) -> dict[str, Any] | None:
    b = report.baseline
    if b is None:
        return None
    return {
        "path": b.path,
        "margin": b.margin,
        "written": b.written,
        "stale": [
            {"layer": e.layer, "code": e.code, "severity": e.severity.label, "value": e.value}
            for e in b.stale
        ],
    }


def render_json(report: AuditReport) -> str:
    # allow_nan=False: a NaN that slipped past _finite is a bug, not invalid JSON in a report.
    return json.dumps(report_dict(report), indent=2, allow_nan=False) + "\n"


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float):
        return finite_or_none(obj)
    return obj


RENDERERS = {
    Format.TABLE: render_table,
    Format.MARKDOWN: render_markdown,
    Format.CSV: render_csv,
    Format.JSON: render_json,
}


def render(report: AuditReport, fmt: Format, *, color: bool = False) -> str:
    """`report` in `fmt`; `color` (ANSI verdicts) applies to the terminal table only."""
    if fmt is Format.TABLE:
        return render_table(report, color)
    return RENDERERS[fmt](report)


def check_writable(path: Path, inputs: list[Path]) -> None:
    """Refuse a report path that is an input, a link or device, or in a missing folder."""
    writing.check_writable(path, inputs)


def write_atomic(path: Path, text: str) -> None:
    """Write one report atomically (a set of one, see `bnaudit.writing`)."""
    writing.write_set([(path, writing.text_writer(text))])


def render_changes(before: AuditReport, after: AuditReport, layers: list[str]) -> str:
    """Before/after of every recalibrated layer, then the new audit's summary line."""
    rows = []
    for name in layers:
        b, a = before.layer(name), after.layer(name)
        rows.append(
            [
                printable(name),
                f"{b.verdict} -> {a.verdict}",
                f"{_num(b.metrics.stale_shift_max, 2)} -> {_num(a.metrics.stale_shift_max, 2)}",
                f"{_num(b.metrics.stale_log_var_max, 2)} -> {_num(a.metrics.stale_log_var_max, 2)}",
                f"{_num(b.metrics.gap_fraction, 2)} -> {_num(a.metrics.gap_fraction, 2)}",
            ]
        )
    table = tabulate(
        rows,
        headers=["layer", "verdict", "shift", "ln var", "gap"],
        tablefmt="simple",
        disable_numparse=True,
    )
    return table + "\n\n" + "\n".join(_summary_lines(after)) + "\n"
