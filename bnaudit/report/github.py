"""GitHub Actions output: workflow-command annotations and the job's step summary.

Layer names come from the checkpoint and are untrusted. The runner executes any output line that
starts with `::command` (after leading spaces) and, in the older syntax, any line containing
`##[command]`. So in GitHub mode the human-readable report is wrapped in
`::stop-commands::TOKEN` ... `::TOKEN::` with a random token (the runner ignores every command in
between), and each annotation is a single line whose text is escaped as the workflow-command
rules require: in the data `%`, CR and LF; in properties also `:` and `,`.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Mapping
from pathlib import Path

from bnaudit.core.errors import ReportError
from bnaudit.core.untrusted import one_line
from bnaudit.report.numbers import percent
from bnaudit.report.record import AuditRecord
from bnaudit.report.terminal import printable
from bnaudit.verdict.results import Finding, Severity, Status

DEFAULT_MAX_ANNOTATIONS = 10  # GitHub shows at most 10 errors and 10 warnings per step
SUMMARY_LIMIT = 1024 * 1024  # GitHub's limit on one step's summary, in bytes
_STALE_SHOWN = 5


class GitHub(str, enum.Enum):
    """Whether to write GitHub Actions annotations and the step summary."""

    AUTO = "auto"  # when GITHUB_ACTIONS=true, as the runner sets it
    ON = "on"
    OFF = "off"

    def enabled(self, environ: Mapping[str, str]) -> bool:
        if self is GitHub.AUTO:
            return environ.get("GITHUB_ACTIONS") == "true"
        return self is GitHub.ON


# --------------------------------------------------------------------------------------------
# Workflow commands


def escape_data(text: str) -> str:
    """Escape the data (message) of a workflow command: `%` first, then CR and LF. (A `##[`
    inside is inert: the runner tries the older syntax only on lines that are no `::` command.)"""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a property value: as data, plus `:` and `,` which delimit properties."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(name: str, data: str, **properties: str | None) -> str:
    """One workflow command line, `::name k=v,k=v::data`, every part escaped."""
    props = ",".join(f"{k}={escape_property(v)}" for k, v in properties.items() if v)
    return f"::{name}{' ' + props if props else ''}::{escape_data(data)}"


def new_token() -> str:
    """An unguessable stop-commands token: untrusted text cannot resume command processing."""
    return secrets.token_hex(16)


def guard(text: str, token: str) -> str:
    """`text` wrapped so that the runner executes no workflow command inside it."""
    if not text:
        return ""
    body = text if text.endswith("\n") else text + "\n"
    return f"::stop-commands::{token}\n{body}::{token}::\n"


def stderr_line(text: str, environ: Mapping[str, str]) -> str:
    """One line of bnaudit's own that quotes input (paths, names): escaped and cut, and under
    GitHub Actions guarded, since the runner reads stderr for commands too."""
    line = one_line(text)
    if environ.get("GITHUB_ACTIONS") == "true":
        return guard(line, new_token())
    return line + "\n"


def for_github(text: str, report: AuditRecord, *, limit: int, environ: Mapping[str, str]) -> str:
    """Stdout under GitHub Actions: `text` guarded (it quotes layer names), then annotations."""
    file = annotation_file(report.checkpoint, environ)
    return guard(text, new_token()) + render_annotations(report, file=file, limit=limit)


def annotation_file(checkpoint: str | None, environ: Mapping[str, str]) -> str | None:
    """The checkpoint path as annotations want it: relative to the workspace where possible."""
    if not checkpoint:
        return None
    workspace = environ.get("GITHUB_WORKSPACE")
    path = Path(checkpoint)
    if workspace and path.is_absolute():
        try:
            return path.relative_to(workspace).as_posix()
        except ValueError:
            return checkpoint
    return path.as_posix()


def annotated(report: AuditRecord) -> list[Finding]:
    """Findings worth an annotation: they count and are warn or worse; failing ones first."""
    shown = [f for f in report.findings if f.counts and f.severity >= Severity.WARN]
    return sorted(shown, key=lambda f: not report.fail_on.fails(f.severity))


def render_annotations(report: AuditRecord, *, file: str | None, limit: int) -> str:
    """`::error`/`::warning` per finding (at most `limit`), then a count of the rest.

    A finding that fails the gate is an error, any other warn-or-worse finding a warning.
    """
    lines = []
    findings = annotated(report)
    for f in findings[:limit]:
        level = "error" if report.fail_on.fails(f.severity) else "warning"
        layer = printable(f.layer)  # a name's own line breaks and escapes stay visible text
        text = f"{layer}: {printable(f.message)}"
        if f.status is Status.WORSE:
            text += f" (worse than the baseline: {printable(f.status_reason)})"
        if f.hint:
            text += f"\nfix: {printable(f.hint)}"
        lines.append(command(level, text, file=file, title=f"bnaudit {f.code}: {layer}"))
    rest = len(findings) - limit
    if rest > 0:
        lines.append(
            command(
                "notice",
                f"{rest} more finding(s) not annotated (max-annotations = {limit}); see the step "
                "summary or the reports",
                title="bnaudit",
            )
        )
    stale = report.baseline.stale if report.baseline else ()
    if stale:
        names = ", ".join(f"{printable(e.layer)} {printable(e.code)}" for e in stale[:_STALE_SHOWN])
        more = f" and {len(stale) - _STALE_SHOWN} more" if len(stale) > _STALE_SHOWN else ""
        lines.append(
            command(
                "notice",
                f"{len(stale)} baseline entr{'y' if len(stale) == 1 else 'ies'} no longer "
                f"found ({names}{more}): write the baseline again to tighten it",
                file=report.baseline.path if report.baseline else None,
                title="bnaudit baseline",
            )
        )
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------------------------
# Step summary (GitHub-flavoured markdown)


def md(text: str) -> str:
    """Untrusted text as inert inline markdown: no links, images, HTML, emphasis or cells."""
    text = " ".join(text.splitlines())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*_[]|~":
        text = text.replace(char, "\\" + char)
    return printable(text)  # other control characters as visible \xNN


def _header(report: AuditRecord) -> list[str]:
    counts = report.counts()
    lines = [
        f"### bnaudit: {report.verdict.upper()}",
        "",
        f"- {len(report.layers)} BatchNorm layers, {report.batches} batches: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f" (fail on: {report.fail_on.value})",
    ]
    if report.checkpoint:
        sha = f" (sha256 {report.sha256[:12]})" if report.sha256 else " (sha256 not computed)"
        lines.insert(2, f"- checkpoint: {md(report.checkpoint)}{sha}")
    status = report.status_counts()
    waived = {k: v for k, v in status.items() if v and k in ("ignored", "baselined")}
    if waived:
        lines.append("- accepted findings: " + ", ".join(f"{v} {k}" for k, v in waived.items()))
    if report.baseline:
        b = report.baseline
        lines.append(
            f"- baseline {md(b.path)}: {status['new']} new, {status['worse']} worse, "
            f"{status['baselined']} baselined, {len(b.stale)} stale "
            f"entr{'y' if len(b.stale) == 1 else 'ies'} (margin {percent(b.margin)}%)"
        )
    lines += [f"- note: {md(n)}" for n in report.notes]
    return [*lines, ""]


def _layer_rows(report: AuditRecord) -> list[str]:
    rows = []
    for r in report.layers:
        counted = [f for f in r.findings if f.counts and f.severity >= Severity.WARN]
        waived = [f for f in r.waived if f.severity >= Severity.WARN]
        if not counted and not waived:
            continue
        codes = ", ".join(dict.fromkeys(f.code for f in counted))
        accepted = ", ".join(dict.fromkeys(f"{f.code} ({f.status.value})" for f in waived))
        rows.append(f"| {md(r.name)} | {r.verdict} | {codes} | {accepted} |")
    return rows


def _finding_items(report: AuditRecord) -> list[str]:
    items = []
    for f in sorted(report.findings, key=lambda f: (not f.counts, -f.severity)):
        if f.severity < Severity.WARN:
            continue
        status = "" if f.status is Status.OPEN else f" [{f.status.value}: {md(f.status_reason)}]"
        fix = f" Fix: {md(f.hint)}" if f.hint and f.counts else ""
        items.append(
            f"- **{f.severity.label.upper()}** {md(f.layer)} `{f.code}`: {md(f.message)}"
            f"{status}{fix}"
        )
    return items


_CUT = "(cut here: a step summary is limited to 1 MiB; the reports have the rest)"


def render_step_summary(report: AuditRecord, max_bytes: int = SUMMARY_LIMIT) -> str:
    """The markdown summary in at most `max_bytes` (UTF-8): whole lines, then a cut notice.

    Layers and findings below warn are left out: the summary is for the people who must act.
    Returns "" when not even the header fits.
    """
    lines: list[str] = []
    budget = max_bytes - len(_CUT) - 2  # the cut notice always has room

    def fits(new: list[str]) -> bool:
        nonlocal budget
        size = sum(len(line.encode("utf-8")) + 1 for line in new)
        if size > budget:
            return False
        lines.extend(new)
        budget -= size
        return True

    if not fits(_header(report)):
        return ""
    blocks: list[tuple[list[str], list[str], list[str]]] = []
    rows = _layer_rows(report)
    if rows:
        rest = len(report.layers) - len(rows)
        tail = ["", f"{rest} more layer(s) without warnings or failures.", ""] if rest else [""]
        head = ["| layer | verdict | findings | accepted |", "|---|---|---|---|"]
        blocks.append((head, rows, tail))
    items = _finding_items(report)
    if items:
        blocks.append(([f"#### Findings ({len(items)})", ""], items, [""]))
    for head, body, tail in blocks:
        if not (fits(head) and all(fits([line]) for line in body) and fits(tail)):
            lines += ["", _CUT]
            break
    return "\n".join(lines) + "\n"


def append_step_summary(report: AuditRecord, path: Path) -> str:
    """Append the summary to `$GITHUB_STEP_SUMMARY` within what is left of its limit.

    Returns what was appended ("" when nothing fits).
    """
    try:
        used = path.stat().st_size if path.exists() else 0
        sep = "\n" if used else ""  # a blank line after what earlier commands wrote
        text = render_step_summary(report, SUMMARY_LIMIT - used - len(sep))
        if text:
            with path.open("a", encoding="utf-8", newline="") as f:
                f.write(sep + text)
    except OSError as exc:
        raise ReportError(f"{path}: cannot append the step summary ({exc.strerror})") from exc
    return text
