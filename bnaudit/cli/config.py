"""`bnaudit config`: the effective settings of `check`, and where each came from."""

from __future__ import annotations

from pathlib import Path

from bnaudit.cli import options as o
from bnaudit.cli.errors import EXIT_OK
from bnaudit.cli.settings_command import Given, settings_command
from bnaudit.cli.streams import out


def _show_settings(given: Given) -> int:
    """Print the effective settings of `check` and where each came from."""
    from bnaudit.gate.config import render_settings, resolve_with_sources

    cli = dict(given.settings)
    given_checkpoint = cli["checkpoint"] is not None
    if not given_checkpoint:  # the settings need one; it is shown as not set
        cli["checkpoint"] = Path("-")
    settings, sources = resolve_with_sources(cli, given.config, Path.cwd())
    unset = frozenset() if given_checkpoint else frozenset({"checkpoint"})
    out(render_settings(settings, sources, unset=unset))
    return EXIT_OK


config = settings_command(_show_settings, o.OptionalCheckpoint, None)
