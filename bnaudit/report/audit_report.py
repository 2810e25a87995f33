"""`AuditReport`: the record of an audit that renders itself, as `bnaudit check` prints it.

The record (`bnaudit.report.record`) is what renderers read; this class sits above them, so that
`report.summary()` needs no import back from a renderer to the record.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnaudit.report.record import AuditRecord
from bnaudit.report.render import Format, render, render_table


# repr=False: the record's one-line repr, not a generated one of every field.
@dataclass(frozen=True, repr=False)
class AuditReport(AuditRecord):
    """The whole audit. `bool(report)` is `report.passed`; `summary()` and `render()` give the
    text `bnaudit check` prints."""

    def summary(self, *, width: int | None = 80, verbose: bool = False) -> str:
        """What `bnaudit check` prints for this report, as plain text: the table fitted to
        `width` columns (None: every column, as `--wide`) and its legend, what the audit ran
        on, the findings grouped by code (`verbose`: one per layer with its message, as
        `--verbose`), and the verdict as the last line."""
        return render_table(self, width=width, verbose=verbose)

    def render(
        self, format: str = "table", *, width: int | None = 80, verbose: bool = False
    ) -> str:
        """The whole report as `bnaudit check --format` prints it: "table" (`summary()`: the
        terminal text, no colour; `width` and `verbose` apply to it alone), "markdown", "csv"
        or "json" (a `bnaudit.report.render.Format` too)."""
        try:
            fmt = Format(format)
        except ValueError:
            choices = ", ".join(f.value for f in Format)
            raise ValueError(f"format {format!r}: choose one of {choices}") from None
        return render(self, fmt, width=width, verbose=verbose)
