"""What `bnaudit check` prints: the table fitted to the terminal and its legend, the context,
the findings grouped by code (or one per layer), and the verdict as the last line."""

from __future__ import annotations

import textwrap
from collections import Counter

from bnaudit.core.version import __version__
from bnaudit.report import table
from bnaudit.report.record import AuditRecord
from bnaudit.report.summary import (
    baseline_lines,
    finding_lines,
    impact_lines,
    note_lines,
    sha256_text,
    summary_line,
    waived_lines,
)
from bnaudit.report.terminal import printable
from bnaudit.verdict.results import Finding, Severity, Status, counted


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
    lines += impact_lines(report)
    lines += note_lines(report)
    out = []
    for line in lines:
        indent = "  " if line.startswith("  ") else ""
        first, *rest = _wrapped(line.strip(), width, indent)
        out += [first, *(("  " + r.lstrip()) for r in rest)] if rest else [first]
    # baseline lines unwrapped: the rerun command in them is to be copied whole
    return out + (baseline_lines(report, report.baseline) if report.baseline else [])


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
