"""Rendering a DiffReport: terminal table (fitted to the terminal), markdown, CSV, JSON, HTML.

The same conventions as `bnaudit.report.render`: names from the checkpoints shown with their control
characters visible, NaN as `-` in tables and null in JSON, findings sorted worst first.
`only_changed` leaves out the layers where nothing changed and nothing was found; the summary
still counts every layer.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable
from typing import Any

from tabulate import tabulate

from bnaudit.compare.results import CHANGES, DiffReport, LayerDiff
from bnaudit.core.version import __version__
from bnaudit.report.json_parts import dumps, finite, gate_dict, layer_dict
from bnaudit.report.markdown import findings_sections
from bnaudit.report.numbers import num
from bnaudit.report.render import Format
from bnaudit.report.summary import finding_lines, waived_lines, worst_lines
from bnaudit.report.table import codes
from bnaudit.report.terminal import paint, printable


def _upstream(r: LayerDiff) -> str:
    m = r.metrics
    if not m.upstream_weights:
        return "-"
    return f"{m.upstream_changed}/{m.upstream_weights}" if m.upstream_changed else "same"


def _t(r: LayerDiff) -> str:
    m = r.metrics
    if m.t_base is None and m.t_new is None:
        return "-"
    if m.t_base == m.t_new:
        return str(m.t_base)
    return f"{num(m.t_base)}->{num(m.t_new)}"


# (header, cell); the terminal table leaves columns out from the end of DROP_ORDER first.
_COLUMNS: dict[str, Callable[[LayerDiff, bool], str]] = {
    "layer": lambda r, c: printable(r.name),
    "C": lambda r, c: str(r.metrics.channels),
    "state": lambda r, c: r.metrics.change,
    "upstream": lambda r, c: _upstream(r),
    "shift": lambda r, c: num(r.metrics.mean_shift_max, 2),
    "ln var": lambda r, c: num(r.metrics.log_var_max, 2),
    "gamma": lambda r, c: num(r.metrics.weight_rel_change, 2),
    "beta": lambda r, c: num(r.metrics.bias_rel_change, 2),
    "T": lambda r, c: _t(r),
    "verdict": lambda r, c: paint(r.verdict, r.verdict) if c else r.verdict,
    "findings": lambda r, c: codes(r),
}
# Least needed first: what a narrow terminal gives up, in turn.
DROP_ORDER = ("beta", "gamma", "C", "ln var", "T", "upstream", "shift")
_MIN_NAME = 12  # layer names are shortened in the middle, down to this, when still too wide


def _rows(report: DiffReport, only_changed: bool) -> list[LayerDiff]:
    return [r for r in report.layers if r.changed or not only_changed]


def _table(
    rows: list[LayerDiff],
    headers: list[str],
    fmt: str,
    color: bool = False,
    widths: list[int | None] | None = None,
) -> str:
    cells = [[_COLUMNS[h](r, color) for h in headers] for r in rows]
    return tabulate(
        cells, headers=headers, tablefmt=fmt, disable_numparse=True, maxcolwidths=widths
    )


def fitted_table(rows: list[LayerDiff], width: int | None, color: bool = False) -> str:
    """The terminal table, columns left out (DROP_ORDER) and names shortened to fit `width`."""
    headers = list(_COLUMNS)
    table = _table(rows, headers, "simple")
    if width is None:
        return _table(rows, headers, "simple", color) if color else table
    for column in DROP_ORDER:
        if _width(table) <= width:
            break
        headers.remove(column)
        table = _table(rows, headers, "simple")
    excess = _width(table) - width
    if excess > 0 and rows:
        longest = max(len(printable(r.name)) for r in rows)
        keep = max(_MIN_NAME, longest - excess)
        rows = [dataclasses.replace(r, name=_shorten(printable(r.name), keep)) for r in rows]
        table = _table(rows, headers, "simple")
    excess = _width(table) - width
    widths: list[int | None] | None = None
    if excess > 0 and rows:  # last resort: the codes wrap onto more lines
        longest = max(len(line) for r in rows for line in [codes(r), "findings"])
        widths = [None] * (len(headers) - 1) + [max(8, longest - excess)]
    return _table(rows, headers, "simple", color, widths)


def _width(table: str) -> int:
    return max((len(line) for line in table.splitlines()), default=0)


def _shorten(name: str, keep: int) -> str:
    if len(name) <= keep:
        return name
    head = (keep - 1) // 2
    return name[:head] + "~" + name[len(name) - (keep - 1 - head) :]


def summary_line(report: DiffReport, color: bool = False) -> str:
    """The one-line verdict (all that `--quiet` prints)."""
    verdict = report.verdict.upper()
    status = report.status_counts()
    accepted = [f"{status[k]} {k}" for k in ("ignored", "baselined") if status[k]]
    return (
        f"bnaudit {__version__} diff: {len(report.layers)} BatchNorm layers, "
        f"{report.upstream_changed()} behind changed weights: "
        f"{paint(verdict, report.verdict) if color else verdict}"
        f" (fail on: {report.fail_on.value})" + (f"; {', '.join(accepted)}" if accepted else "")
    )


def _summary_lines(report: DiffReport, color: bool = False) -> list[str]:
    lines = [summary_line(report, color)]
    if report.base:
        lines.append(f"base: {printable(report.base)} (sha256 {report.base_sha256})")
        lines.append(f"new: {printable(report.new or '')} (sha256 {report.new_sha256})")
    changes = report.changes()
    lines.append(
        "layer state (gamma, beta, running stats, T): "
        + ", ".join(f"{k} {changes[k]}" for k in CHANGES if changes[k])
    )
    by_code = report.code_counts()
    if by_code:
        lines.append("findings: " + ", ".join(f"{k} {v}" for k, v in sorted(by_code.items())))
    lines += worst_lines(report.layers)
    b = report.baseline
    if b is not None:
        status = report.status_counts()
        verb = "written to" if b.written else "compared with"
        lines.append(
            f"baseline: {verb} {b.path}: {status['new']} new, {status['worse']} worse, "
            f"{status['baselined']} baselined, {len(b.stale)} stale"
        )
    lines += [f"note: {printable(n)}" for n in report.notes]
    return lines


def render_table(
    report: DiffReport, color: bool = False, width: int | None = None, only_changed: bool = False
) -> str:
    rows = _rows(report, only_changed)
    parts = [fitted_table(rows, width, color) if rows else "(no layer changed)", ""]
    parts += _summary_lines(report, color)
    findings = finding_lines(report)
    if findings:
        parts += ["", "findings:", *findings]
    waived = waived_lines(report)
    if waived:
        parts += ["", "accepted (ignored or baselined; they do not fail the gate):", *waived]
    return "\n".join(parts) + "\n"


def render_markdown(report: DiffReport, only_changed: bool = False) -> str:
    rows = _rows(report, only_changed)
    table = _table(rows, list(_COLUMNS), "github") if rows else "(no layer changed)"
    parts = [
        f"# bnaudit diff: {report.verdict.upper()}",
        "",
        *[f"- {s}" for s in _summary_lines(report)[1:]],
        "",
        table,
        *findings_sections(report),
    ]
    return "\n".join(parts) + "\n"


def render_csv(report: DiffReport, only_changed: bool = False) -> str:
    return report.to_frame(only_changed).to_csv(index=False)


def report_dict(report: DiffReport, only_changed: bool = False) -> dict[str, Any]:
    b = report.baseline
    return finite(
        {
            "bnaudit_version": __version__,
            "base": {"checkpoint": report.base, "sha256": report.base_sha256},
            "new": {"checkpoint": report.new, "sha256": report.new_sha256},
            "summary": {
                **gate_dict(report),
                "upstream": report.upstream,
                "upstream_changed": report.upstream_changed(),
                "changes": report.changes(),
                "counts": report.counts(),
                "codes": report.code_counts(),
                "findings": report.status_counts(),
                "notes": list(report.notes),
            },
            "baseline": None
            if b is None
            else {"path": b.path, "margin": b.margin, "written": b.written, "stale": len(b.stale)},
            "layers": [layer_dict(r) for r in _rows(report, only_changed)],
        }
    )


def render_json(report: DiffReport, only_changed: bool = False) -> str:
    return dumps(report_dict(report, only_changed))


_CSP = "default-src 'none'; style-src 'unsafe-inline'"
_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #111827; margin: 24px; }
table { border-collapse: collapse; } th, td { border-bottom: 1px solid #e5e7eb;
  padding: 3px 8px; text-align: left; } td.num { text-align: right; }
.fail { color: #c62828; font-weight: 600; } .warn { color: #b45309; font-weight: 600; }
.info { color: #0277bd; } .ok { color: #2e7d32; } ul { padding-left: 20px; }
"""


def render_html(report: DiffReport, only_changed: bool = False) -> str:
    """One self-contained file: no script, no network (the CSP forbids both)."""

    def e(text: object) -> str:
        return html.escape(str(text), quote=True)

    headers = list(_COLUMNS)
    rows = []
    for r in _rows(report, only_changed):
        cells = []
        for h in headers:
            value = _COLUMNS[h](r, False)
            css = f' class="{r.verdict}"' if h == "verdict" else ""
            cells.append(f"<td{css}>{e(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    findings = [
        f'<li><span class="{f.severity.label}">{e(f.severity.label.upper())}</span> '
        f"<code>{e(f.layer)}</code> {e(f.code)}"
        + (f" [{e(f.status.value)}: {e(f.status_reason)}]" if not f.counts else "")
        + f": {e(f.message)}<br><small>fix: {e(f.hint)}</small></li>"
        for f in sorted(report.findings, key=lambda f: -f.severity)
    ]
    summary = "".join(f"<li>{e(s)}</li>" for s in _summary_lines(report))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>bnaudit diff: {e(report.verdict.upper())}</title><style>{_CSS}</style></head>"
        f'<body><h1>bnaudit diff: <span class="{"ok" if report.passed else "fail"}">'
        f"{e(report.verdict.upper())}</span></h1><ul>{summary}</ul>"
        "<h2>Layers</h2><table><thead><tr>"
        + "".join(f"<th>{e(h)}</th>" for h in headers)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table><h2>Findings</h2><ul>"
        + ("".join(findings) or "<li>None.</li>")
        + "</ul></body></html>\n"
    )


def render(
    report: DiffReport,
    fmt: Format,
    *,
    color: bool = False,
    width: int | None = None,
    only_changed: bool = False,
) -> str:
    """`report` in `fmt`; `color` and `width` apply to the terminal table only."""
    if fmt is Format.TABLE:
        return render_table(report, color, width, only_changed)
    renderer = {
        Format.MARKDOWN: render_markdown,
        Format.CSV: render_csv,
        Format.JSON: render_json,
    }[fmt]
    return renderer(report, only_changed)
