"""`bnaudit show`: one layer explained, with its errors measured when there are batches."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from bnaudit.cli import command_options as c
from bnaudit.cli import options as o
from bnaudit.cli.errors import EXIT_OK, guard
from bnaudit.cli.parsed import settings_of
from bnaudit.cli.streams import out
from bnaudit.core.errors import BnauditError
from bnaudit.gate.config import resolve


def show(
    checkpoint: c.Checkpoint,
    layer: c.Layer,
    model: c.Model = None,
    model_arg: c.ModelArg = None,
    data: c.ShowData = None,
    input: c.Input = None,
    input_shape: c.ShowInputShape = None,
    batch_size: c.BatchSize = None,
    batches: c.Batches = None,
    device: c.Device = None,
    seed: c.Seed = None,
    trust: c.ShowTrust = False,
    config: c.Config = None,
    debug: o.Debug = False,
) -> None:
    """Explain one layer: attributes, exact train/eval formulas, runnable code, errors."""
    cli = settings_of(locals())
    raise typer.Exit(guard(lambda: _show(cli, config, layer), debug))


def _show(cli: dict[str, Any], config: Path | None, layer: str) -> int:
    from bnaudit.check.audit import audit
    from bnaudit.check.run import Prepared, audit_options, prepare
    from bnaudit.show.view import describe, find_layer, render_layer

    settings = resolve(cli, config, Path.cwd())
    p = prepare(settings, log=sys.stderr)
    if not isinstance(p, Prepared):
        raise BnauditError(f"{settings.checkpoint}: show needs the architecture: pass --model")
    find_layer(p.model, layer)  # a wrong name fails before any forward pass
    result = None
    if settings.data or settings.input_shape:
        report = audit(p.model, p.batches, options=audit_options(settings, p, layers=(layer,)))
        result = report.layer(layer)
    out(render_layer(describe(p.model, layer, result)))
    return EXIT_OK
