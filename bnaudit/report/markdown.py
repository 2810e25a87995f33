"""The markdown report: the verdict, the summary's facts, every layer with every column (the
terminal table's cells, nothing shortened), then the findings."""

from __future__ import annotations

from tabulate import tabulate

from bnaudit.report.record import AuditRecord, Gated
from bnaudit.report.summary import finding_lines, summary_lines, waived_lines
from bnaudit.report.table import COLUMNS


def findings_sections(report: Gated) -> list[str]:
    """`## Findings` (or None.), then `## Accepted findings` where any is waived: the end of
    the audit's and the diff's markdown alike."""
    parts = ["", "## Findings", "", *(finding_lines(report, bullet="- ") or ["None."])]
    waived = waived_lines(report, bullet="- ")
    if waived:
        parts += ["", "## Accepted findings", "", *waived]
    return parts


def render_markdown(report: AuditRecord) -> str:
    rows = [[c.cell(r) for c in COLUMNS] for r in report.layers]
    grid = tabulate(
        rows, headers=[c.header for c in COLUMNS], tablefmt="github", disable_numparse=True
    )
    *facts, verdict = summary_lines(report)
    legend = "; ".join(c.legend for c in COLUMNS if c.legend)
    parts = [
        f"# bnaudit report: {report.verdict.upper()}",
        "",
        f"**{verdict}**",
        "",
        *[f"- {s}" for s in facts],
        "",
        grid,
        "",
        f"Columns: {legend}.",
        *findings_sections(report),
    ]
    return "\n".join(parts) + "\n"
