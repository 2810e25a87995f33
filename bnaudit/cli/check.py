"""`bnaudit check`: the audit, its reports, and its verdict as the exit code."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bnaudit.checkpoint import digest
from bnaudit.cli import options as o
from bnaudit.cli.errors import EXIT_FINDINGS, EXIT_NOTHING, EXIT_OK
from bnaudit.cli.settings_command import Given, settings_command
from bnaudit.cli.streams import error, out
from bnaudit.core.errors import NothingToAudit
from bnaudit.gate.config import CheckSettings, hash_skipped, resolve
from bnaudit.report.table import DEFAULT_WIDTH

if TYPE_CHECKING:
    from bnaudit.distributed import Ranks
    from bnaudit.report import AuditReport


def _audit(given: Given) -> int:
    """Audit every BatchNorm layer: reconstruction, stale stats, variance bias, momentum."""
    cli = dict(given.settings)
    if isinstance(cli.get("checkpoint"), Path):
        settings = resolve(cli, given.config, Path.cwd())  # no torch yet: it imports in run_check
        if hash_skipped(settings, os.environ) is None:
            digest.prefetch(settings.checkpoint)  # hashes while torch imports
    from bnaudit import distributed

    # Under torchrun every rank runs this; rank 0 alone writes reports and stdout, and every
    # rank returns rank 0's exit code, or 2 with the message of a rank that failed.
    with distributed.session() as ranks:
        code = _audit_rank(given, ranks)
        return code if ranks is None else ranks.agree(code)


def _audit_rank(given: Given, ranks: Ranks | None) -> int:
    from bnaudit.check.run import run_check, write_reports
    from bnaudit.report.render import render, summary_line
    from bnaudit.report.terminal import Progress, color_enabled, is_terminal

    settings = resolve(dict(given.settings), given.config, Path.cwd())
    follower = ranks is not None and not ranks.leader
    quiet = given.quiet
    if ranks is not None:
        settings = ranks.settings(settings)  # its device; no report files but on rank 0
        quiet = quiet or follower
    bar = Progress(sys.stderr) if not quiet and is_terminal(sys.stderr) else None
    try:
        log = None if quiet else bar or sys.stderr  # a log line does not run into the bar
        if settings.against is not None:
            from bnaudit.artifact import run_artifact_check

            report = run_artifact_check(settings, log=log, progress=bar, ranks=ranks)
        else:
            report = run_check(settings, log=log, progress=bar, ranks=ranks)
    except NothingToAudit as exc:
        error(f"bnaudit: nothing to audit: {exc}")
        return EXIT_NOTHING
    finally:
        if bar is not None:
            bar.close()
    write_reports(report, settings)
    if follower:  # rank 0 prints the report
        return EXIT_OK if report.passed else EXIT_FINDINGS
    color = color_enabled(sys.stdout, os.environ)
    width = None if given.wide else shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    text = (
        summary_line(report, color) + "\n"
        if quiet
        else render(report, settings.format, color=color, width=width, verbose=given.verbose)
    )
    out(_with_github(text, report, settings))
    return EXIT_OK if report.passed else EXIT_FINDINGS


def _with_github(text: str, report: AuditReport, settings: CheckSettings) -> str:
    """Under GitHub Actions: the annotations with `text`, and the step summary appended."""
    from bnaudit.report import github as annotations

    if not settings.github.enabled(os.environ):
        return text
    text = annotations.for_github(text, report, limit=settings.max_annotations, environ=os.environ)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary and not annotations.append_step_summary(report, Path(summary)):
        error(f"bnaudit: {summary}: the step summary is full; not appended")
    return text


check = settings_command(_audit, o.AuditedCheckpoint, ...)
