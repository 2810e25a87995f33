"""Rendering a watched run: terminal table, markdown, CSV, JSON.

The conventions of `bnaudit.report.render`: names shown with their control characters visible,
NaN as `-` in tables and null in JSON, findings worst first, the verdict line last.
"""

from __future__ import annotations

from tabulate import tabulate

from bnaudit.core.version import __version__
from bnaudit.report.json_parts import dumps, finite, gate_dict, layer_dict
from bnaudit.report.markdown import findings_sections
from bnaudit.report.numbers import num
from bnaudit.report.render import Format
from bnaudit.report.summary import finding_lines, worst_lines
from bnaudit.report.table import codes
from bnaudit.report.terminal import printable
from bnaudit.verdict.results import counted
from bnaudit.watching.results import WatchLayer, WatchRecord

HEADERS = [
    "layer",
    "m",
    "implied m",
    "train calls",
    "updates",
    "micro-batches",
    "verdict",
    "findings",
]


def _momentum(value: float | None) -> str:
    return "None" if value is None else num(value)


def _row(r: WatchLayer) -> list[str]:
    m = r.metrics
    return [
        printable(r.name),
        _momentum(m.momentum),
        num(m.implied_momentum_median),
        str(m.train_calls),
        str(m.updates),
        str(m.micro_batches),
        r.verdict,
        codes(r),
    ]


def _grid(report: WatchRecord, fmt: str) -> str:
    return tabulate(
        [_row(r) for r in report.layers], headers=HEADERS, tablefmt=fmt, disable_numparse=True
    )


def summary_line(report: WatchRecord) -> str:
    """The verdict in one line."""
    failing = report.failing
    gate = (
        f"{counted(len(failing), 'finding')} at {report.fail_on.value} or worse"
        if failing
        else f"no finding at {report.fail_on.value} or worse"
    )
    return (
        f"{report.verdict.upper()}: {gate}; {counted(len(report.layers), 'BN layer')} watched "
        f"over {counted(report.watched, 'optimizer step')}"
    )


def summary_lines(report: WatchRecord) -> list[str]:
    """The facts, then the verdict line."""
    head = f"bnaudit {__version__} watch: {report.watched} of {report.steps} steps watched"
    notes = [f"note: {printable(n)}" for n in report.notes]
    return [head, *worst_lines(report.layers), *notes, summary_line(report)]


def render_table(report: WatchRecord) -> str:
    *facts, verdict = summary_lines(report)
    lines = [_grid(report, "simple"), "", *facts]
    found = finding_lines(report)
    if found:
        lines += ["", *found]
    return "\n".join([*lines, "", verdict]) + "\n"


def render_markdown(report: WatchRecord) -> str:
    *facts, verdict = summary_lines(report)
    parts = [
        f"# bnaudit watch: {report.verdict.upper()}",
        "",
        f"**{verdict}**",
        "",
        *[f"- {s}" for s in facts],
        "",
        _grid(report, "github"),
        *findings_sections(report),
    ]
    return "\n".join(parts) + "\n"


def render_csv(report: WatchRecord) -> str:
    return report.to_frame().to_csv(index=False)


def render_json(report: WatchRecord) -> str:
    return dumps(
        finite(
            {
                "bnaudit_version": __version__,
                "summary": {
                    **gate_dict(report),
                    "steps": report.steps,
                    "watched": report.watched,
                    "every": report.every,
                    "accumulate": report.accumulate,
                    "notes": list(report.notes),
                },
                "layers": [layer_dict(r) for r in report.layers],
            }
        )
    )


def render(report: WatchRecord, fmt: Format) -> str:
    return {
        Format.TABLE: render_table,
        Format.MARKDOWN: render_markdown,
        Format.CSV: render_csv,
        Format.JSON: render_json,
    }[fmt](report)
