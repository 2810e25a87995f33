"""Rendering an AuditRecord: terminal table, markdown, CSV, JSON; atomic report files."""

from __future__ import annotations

import dataclasses
import enum
import json
import textwrap
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from bnaudit.core.version import __version__
from bnaudit.report import table, writing
from bnaudit.report.record import AuditRecord
from bnaudit.report.table import COLUMNS as SCREEN_COLUMNS
from bnaudit.report.table import codes, num
from bnaudit.report.terminal import paint, printable
from bnaudit.verdict.codes import CODES
from bnaudit.verdict.results import (
    FailOn,
    Finding,
    LayerResult,
    Severity,
    Status,
    counted,
    finite_or_none,
)

if TYPE_CHECKING:
    from bnaudit.report.record import BaselineCheck


class Format(str, enum.Enum):
    TABLE = "table"
    MARKDOWN = "markdown"
    CSV = "csv"
    JSON = "json"


_HEADERS = [c.header for c in SCREEN_COLUMNS]  # the terminal table's, every one
_WORST_SHOWN = 5


def _row(r: LayerResult, color: bool = False) -> list[str]:
    m = r.metrics
    judged = m.stale_judged == "yes"
    return [
        printable(r.name),
        printable(r.type),
        str(m.channels),
        num(m.values_per_channel or None),
        paint(r.verdict, r.verdict) if color else r.verdict,
        num(m.recon_train_ratio, 2),
        num(m.recon_eval_ratio, 2),
        num(m.stale_shift_max, 2) if judged else "-",
        num(m.stale_log_var_max, 2) if judged else "-",
        num(m.gap_fraction, 2) if m.gap_judged == "yes" else "-",
        "cumul." if m.momentum is None else num(m.momentum),
        num(m.num_batches_tracked),
        codes(r),
    ]


def summary_line(report: AuditRecord, color: bool = False) -> str:
    """The verdict in one line, last of the table output and all that `--quiet` prints: what
    fails the gate, or which checks ran when not all of them did, then the layer counts."""
    verdict = report.verdict.upper()
    parts = [_gate(report)]
    if report.checks_run is not None and report.failing:  # a failing static audit says it too
        parts.append(_partial(report))
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


def _summary_lines(report: AuditRecord, color: bool = False) -> list[str]:
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
    worst = sorted(
        (r for r in report.layers if r.severity >= Severity.WARN), key=lambda r: -r.severity
    )[:_WORST_SHOWN]
    for r in worst:
        found = ", ".join(
            dict.fromkeys(f.code for f in r.findings if f.counts and f.severity == r.severity)
        )
        lines.append(f"worst: {printable(r.name)} ({r.verdict}: {found})")
    if report.baseline:
        lines += _baseline_lines(report, report.baseline)
    lines += _impact_lines(report)
    if report.synthetic_data:
        lines.append("note: synthetic N(0,1) batches: data-dependent verdicts are not drawn")
    lines += [f"note: {printable(n)}" for n in report.notes]
    return [*lines, summary_line(report, color)]


def _baseline_lines(report: AuditRecord, b: BaselineCheck) -> list[str]:
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


def _impact_lines(report: AuditRecord) -> list[str]:
    i = report.impact
    if i is None:
        return []
    top1 = "" if i.top1_agreement is None else f", top-1 agreement {100 * i.top1_agreement:.1f}%"
    lines = [
        f"output impact of recalibrating ({i.regime} regime, {i.forward_passes} extra passes): "
        f"rel L2 {num(i.rel_l2)}, max abs {num(i.max_abs)}{top1}"
    ]
    ranked = sorted(i.per_layer.items(), key=lambda kv: -kv[1])
    lines += [f"  {name} alone: rel L2 {num(change)}" for name, change in ranked]
    if i.evidence is not None:
        lines.append(f"  {i.evidence.describe()}")
    return lines


def finding_lines(report: AuditRecord, bullet: str = "") -> list[str]:
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


def waived_lines(report: AuditRecord, bullet: str = "") -> list[str]:
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


def _grouped_lines(findings: list[Finding], width: int | None, waived: bool = False) -> list[str]:
    """One line per (code, severity, status): the count and the layers, as `ruff --statistics`
    does; then the most common fix (for waived findings: the most common reason)."""
    groups: dict[tuple[str, Severity, Status], list[Finding]] = {}
    for f in sorted(findings, key=lambda f: -f.severity):
        groups.setdefault((f.code, f.severity, f.status), []).append(f)
    names = [
        code if status is Status.OPEN else f"{code} [{status.value}]" for code, _, status in groups
    ]
    code_w = max((len(n) for n in names), default=0)
    count_w = max((len(str(len(g))) for g in groups.values()), default=1)
    lines = []
    for name, ((_, severity, status), group) in zip(names, groups.items(), strict=True):
        head = f"{severity.label.upper():4}  {name:<{code_w}}  {len(group):>{count_w}}  "
        layers = [printable(f.layer) for f in group]
        lines.append(head + _listed(layers, None if width is None else width - len(head)))
        hints = Counter(printable(f.status_reason if waived else f.hint) for f in group)
        hints.pop("", None)
        if hints:
            text, _ = hints.most_common(1)[0]
            more = len(hints) - 1
            if more:
                text += f" (and {more} other {'reasons' if waived else 'fixes'}: --verbose)"
            lines += _wrapped(f"{status.value if waived else 'fix'}: {text}", width, "      ")
    return lines


def _listed(names: list[str], room: int | None) -> str:
    """`a, b, c`, cut to `room` characters with a count of the rest (`a, b, +5 more`)."""
    text = ", ".join(names)
    if room is None or len(text) <= room:
        return text
    for keep in range(len(names) - 1, 0, -1):
        text = ", ".join(names[:keep]) + f", +{len(names) - keep} more"
        if len(text) <= room:
            return text
    if len(names) == 1:
        return table.shorten(text, max(room, 8))
    return f"{table.shorten(names[0], max(room - 10, 8))}, +{len(names) - 1} more"


def _wrapped(text: str, width: int | None, indent: str) -> list[str]:
    if width is None:
        return [indent + text]
    return textwrap.wrap(
        text,
        width,
        initial_indent=indent,
        subsequent_indent=indent,
        break_on_hyphens=False,
        break_long_words=False,  # paths and code stay whole, to be copied
    ) or [indent]


def _context_lines(report: AuditRecord, width: int | None, verbose: bool) -> list[str]:
    """What the audit ran on and what it measured beyond the table: checkpoint, passes, output
    impact, baseline, notes; wrapped to `width`."""
    lines = []
    if report.checkpoint:
        short = not (verbose or width is None)
        lines.append(
            f"checkpoint: {printable(report.checkpoint)} (sha256 {sha256_text(report, short)})"
        )
    lines.append(
        f"bnaudit {__version__}: {counted(report.batches, 'batch', 'batches')}, "
        f"{counted(report.forward_passes, 'forward pass', 'forward passes')}"
    )
    lines += _impact_lines(report)
    if report.synthetic_data:
        lines.append("note: synthetic N(0,1) batches: data-dependent verdicts are not drawn")
    lines += [f"note: {printable(n)}" for n in report.notes]
    out = []
    for line in lines:
        indent = "  " if line.startswith("  ") else ""
        first, *rest = _wrapped(line.strip(), width, indent)
        out += [first, *(("  " + r.lstrip()) for r in rest)] if rest else [first]
    # baseline lines unwrapped: the rerun command in them is to be copied whole
    return out + (_baseline_lines(report, report.baseline) if report.baseline else [])


def render_table(
    report: AuditRecord,
    color: bool = False,
    *,
    width: int | None = table.DEFAULT_WIDTH,
    verbose: bool = False,
) -> str:
    """The terminal output: the table at most `width` columns wide (None: every column),
    its legend, the context, the findings grouped by code (`verbose`: one per layer, with
    its message), and the verdict as the last line."""
    grid, legend = table.render(report.layers, width=width, color=color)
    parts = [grid, legend, "", *_context_lines(report, width, verbose)]
    counted = [f for f in report.findings if f.counts]
    waived = [f for f in report.findings if not f.counts]
    if counted:
        if verbose:
            parts += ["", "findings:", *finding_lines(report)]
        else:
            parts += ["", f"findings ({len(counted)}; --verbose for each message):"]
            parts += _grouped_lines(counted, width)
    if waived:
        parts += ["", "accepted (ignored or baselined; they do not fail the gate):"]
        parts += waived_lines(report) if verbose else _grouped_lines(waived, width, waived=True)
    parts += ["", summary_line(report, color)]
    return "\n".join(parts) + "\n"


def render_markdown(report: AuditRecord) -> str:
    table = tabulate(
        [_row(r) for r in report.layers], headers=_HEADERS, tablefmt="github", disable_numparse=True
    )
    *facts, verdict = _summary_lines(report)
    legend = "; ".join(c.legend for c in SCREEN_COLUMNS if c.legend)
    parts = [
        f"# bnaudit report: {report.verdict.upper()}",
        "",
        f"**{verdict}**",
        "",
        *[f"- {s}" for s in facts],
        "",
        table,
        "",
        f"Columns: {legend}.",
    ]
    findings = finding_lines(report, bullet="- ")
    parts += ["", "## Findings", "", *(findings or ["None."])]
    waived = waived_lines(report, bullet="- ")
    if waived:
        parts += ["", "## Accepted findings", "", *waived]
    return "\n".join(parts) + "\n"


def sha256_text(report: AuditRecord, short: bool = False) -> str:
    """The checkpoint's SHA-256 as the reports show it (`short`: 12 digits and "…"), or, where
    it was not computed, why: never an empty string that could pass for a value."""
    if report.sha256 is None:
        return report.sha256_note or "not computed"
    return report.sha256[:12] + "…" if short else report.sha256


def render_csv(report: AuditRecord) -> str:
    frame = report.to_frame()
    frame["sha256"] = sha256_text(report)  # the file's provenance on every row
    return frame.to_csv(index=False)


def report_dict(report: AuditRecord) -> dict[str, Any]:
    return finite(
        {
            "bnaudit_version": __version__,
            "checkpoint": report.checkpoint,
            "sha256": report.sha256,
            "sha256_note": report.sha256_note,  # null when sha256 holds the hash
            "summary": {
                "verdict": report.verdict,
                "fail_on": report.fail_on.value,
                "layers": len(report.layers),
                "counts": report.counts(),
                "findings": report.status_counts(),
                "batches": report.batches,
                "forward_passes": report.forward_passes,
                "synthetic_data": report.synthetic_data,
                # the codes judged when not all were (static audit, no batch); null: all
                "checks_run": None if report.checks_run is None else list(report.checks_run),
                "notes": list(report.notes),
                "impact": dataclasses.asdict(report.impact) if report.impact else None,
                "model_findings": [finding_dict(f) for f in report.model_findings],
            },
            "baseline": _baseline_dict(report),
            "thresholds": report.thresholds,
            "layers": [
                {
                    "name": r.name,
                    "type": r.type,
                    "verdict": r.verdict,
                    "metrics": dataclasses.asdict(r.metrics),
                    "findings": [finding_dict(f) for f in r.findings],
                }
                for r in report.layers
            ],
        }
    )


def finding_dict(f: Finding) -> dict[str, Any]:
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


def _baseline_dict(report: AuditRecord) -> dict[str, Any] | None:
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


def render_json(report: AuditRecord) -> str:
    # allow_nan=False: a NaN that slipped past finite is a bug, not invalid JSON in a report.
    return json.dumps(report_dict(report), indent=2, allow_nan=False) + "\n"


def finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float):
        return finite_or_none(obj)
    return obj


RENDERERS = {
    Format.TABLE: render_table,
    Format.MARKDOWN: render_markdown,
    Format.CSV: render_csv,
    Format.JSON: render_json,
}


def render(
    report: AuditRecord,
    fmt: Format,
    *,
    color: bool = False,
    width: int | None = table.DEFAULT_WIDTH,
    verbose: bool = False,
) -> str:
    """`report` in `fmt`; `color` (ANSI verdicts), `width` (None: unlimited) and `verbose`
    (every finding with its message) apply to the terminal table only."""
    if fmt is Format.TABLE:
        return render_table(report, color, width=width, verbose=verbose)
    return RENDERERS[fmt](report)


def check_writable(path: Path, inputs: list[Path]) -> None:
    """Refuse a report path that is an input, a link or device, or in a missing folder."""
    writing.check_writable(path, inputs)


def write_atomic(path: Path, text: str) -> None:
    """Write one report atomically (a set of one, see `bnaudit.report.writing`)."""
    writing.write_set([(path, writing.text_writer(text))])


def render_changes(before: AuditRecord, after: AuditRecord, layers: list[str]) -> str:
    """Before/after of every recalibrated layer, then the new audit's summary line."""
    rows = []
    for name in layers:
        b, a = before.layer(name), after.layer(name)
        rows.append(
            [
                printable(name),
                f"{b.verdict} -> {a.verdict}",
                f"{num(b.metrics.stale_shift_max, 2)} -> {num(a.metrics.stale_shift_max, 2)}",
                f"{num(b.metrics.stale_log_var_max, 2)} -> {num(a.metrics.stale_log_var_max, 2)}",
                f"{num(b.metrics.gap_fraction, 2)} -> {num(a.metrics.gap_fraction, 2)}",
            ]
        )
    table = tabulate(
        rows,
        headers=["layer", "verdict", "shift", "ln var", "gap"],
        tablefmt="simple",
        disable_numparse=True,
    )
    return table + "\n\n" + "\n".join(_summary_lines(after)) + "\n"
