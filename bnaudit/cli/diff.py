"""`bnaudit diff`: what changed in the BatchNorm state between two checkpoints, without data."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import typer

from bnaudit.cli import command_options as c
from bnaudit.cli import options as o
from bnaudit.cli.errors import EXIT_FINDINGS, EXIT_NOTHING, EXIT_OK, guard
from bnaudit.cli.parsed import settings_of
from bnaudit.core.errors import NothingToAudit
from bnaudit.gate.config import resolve


def diff(
    base: c.Base,
    new: c.New,
    key: c.BaseKey = None,
    key_new: c.NewKey = None,
    model: c.DiffModel = None,
    trust: c.DiffTrust = False,
    fmt: c.DiffFormat = None,
    markdown: c.DiffMarkdown = None,
    csv: c.DiffCsv = None,
    json_path: c.DiffJson = None,
    html: c.DiffHtml = None,
    quiet: c.DiffQuiet = False,
    only_changed: c.OnlyChanged = False,
    fail_on: c.DiffFailOn = None,
    baseline: c.DiffBaseline = None,
    write_baseline: c.DiffWriteBaseline = None,
    baseline_margin: c.DiffBaselineMargin = None,
    config: c.Config = None,
    debug: o.Debug = False,
) -> None:
    """What changed in the BatchNorm state between two checkpoints, without data."""
    cli = settings_of(locals())
    raise typer.Exit(guard(lambda: _diff(cli, config, new, key_new, only_changed, quiet), debug))


def _diff(
    cli: dict[str, Any],
    config: Path | None,
    new: Path,
    key_new: str | None,
    only_changed: bool,
    quiet: bool,
) -> int:
    from bnaudit.compare.command import DiffSettings, run_diff, write_reports
    from bnaudit.compare.render import render, summary_line
    from bnaudit.report.terminal import color_enabled, is_terminal

    settings = resolve(cli, config, Path.cwd())
    d = DiffSettings(new, key_new, only_changed)
    try:
        report = run_diff(settings, d, log=None if quiet else sys.stderr)
    except NothingToAudit as exc:
        typer.echo(f"bnaudit: nothing to compare: {exc}", err=True)
        return EXIT_NOTHING
    write_reports(report, settings, d)
    color = color_enabled(sys.stdout, os.environ)
    fits = is_terminal(sys.stdout) or "COLUMNS" in os.environ
    width = shutil.get_terminal_size().columns if fits else None
    text = (
        summary_line(report, color) + "\n"
        if quiet
        else render(report, settings.format, color=color, width=width, only_changed=only_changed)
    )
    sys.stdout.write(text)
    return EXIT_OK if report.passed else EXIT_FINDINGS
