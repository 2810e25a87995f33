"""Rendering an AuditRecord in a chosen format (terminal table, markdown, CSV, JSON); the
recalibration's before/after table; atomic report files.

The text renderers live in their own modules (`screen`, `markdown`, `summary`); their names are
imported here too, the paths the commands and the Python API have always used.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

from tabulate import tabulate

from bnaudit.core.version import __version__
from bnaudit.report import table, writing
from bnaudit.report.json_parts import dumps, finding_dict, finite, gate_dict, layer_dict
from bnaudit.report.markdown import render_markdown
from bnaudit.report.numbers import num
from bnaudit.report.record import AuditRecord
from bnaudit.report.screen import render_table
from bnaudit.report.summary import (
    finding_lines,
    sha256_text,
    summary_line,
    summary_lines,
    waived_lines,
)
from bnaudit.report.terminal import printable

__all__ = [
    "RENDERERS",
    "Format",
    "check_writable",
    "finding_dict",
    "finding_lines",
    "finite",
    "printable",
    "render",
    "render_changes",
    "render_csv",
    "render_json",
    "render_markdown",
    "render_table",
    "report_dict",
    "sha256_text",
    "summary_line",
    "waived_lines",
    "write_atomic",
]


class Format(str, enum.Enum):
    TABLE = "table"
    MARKDOWN = "markdown"
    CSV = "csv"
    JSON = "json"


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
                **gate_dict(report),
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
            "layers": [layer_dict(r) for r in report.layers],
        }
    )


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
    return dumps(report_dict(report))


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
        b_stale, a_stale = b.metrics.train.drift, a.metrics.train.drift
        b_gap, a_gap = b.metrics.eval.drift, a.metrics.eval.drift
        rows.append(
            [
                printable(name),
                f"{b.verdict} -> {a.verdict}",
                f"{num(b_stale.shift_max, 2)} -> {num(a_stale.shift_max, 2)}",
                f"{num(b_stale.log_var_max, 2)} -> {num(a_stale.log_var_max, 2)}",
                f"{num(b_gap.fraction, 2)} -> {num(a_gap.fraction, 2)}",
            ]
        )
    grid = tabulate(
        rows,
        headers=["layer", "verdict", "shift", "ln var", "gap"],
        tablefmt="simple",
        disable_numparse=True,
    )
    return grid + "\n\n" + "\n".join(summary_lines(after)) + "\n"
