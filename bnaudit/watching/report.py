"""`WatchReport`: the record of a watched training run that renders itself."""

from __future__ import annotations

from dataclasses import dataclass

from bnaudit.report.render import Format
from bnaudit.watching.render import render, summary_lines
from bnaudit.watching.results import WatchRecord


# repr=False: one line, not a generated repr of every field.
@dataclass(frozen=True, repr=False)
class WatchReport(WatchRecord):
    """What the watcher found. `bool(report)` is `report.passed`; `render()` gives it as a
    table, markdown, CSV or JSON."""

    def summary(self) -> str:
        """The facts and the verdict, as plain text."""
        return "\n".join(summary_lines(self))

    def render(self, format: str = "table") -> str:
        """The report as "table" (terminal text), "markdown", "csv" or "json"."""
        try:
            fmt = Format(format)
        except ValueError:
            choices = ", ".join(f.value for f in Format)
            raise ValueError(f"format {format!r}: choose one of {choices}") from None
        return render(self, fmt)

    def __repr__(self) -> str:
        return f"<WatchReport {summary_lines(self)[-1]}>"
