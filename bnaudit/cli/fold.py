"""`bnaudit fold`: every conv/linear -> BN pair folded, the folded output checked, then written."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from bnaudit.cli import command_options as c
from bnaudit.cli import options as o
from bnaudit.cli.errors import EXIT_OK, guard
from bnaudit.cli.parsed import settings_of
from bnaudit.cli.streams import out
from bnaudit.gate.config import resolve


def fold(
    checkpoint: c.Checkpoint,
    output: c.FoldedOutput,
    model: c.Model = None,
    model_arg: c.ModelArg = None,
    data: c.FoldData = None,
    input: c.Input = None,
    input_shape: c.FoldInputShape = None,
    batch_size: c.BatchSize = None,
    batches: c.Batches = None,
    key: c.Key = None,
    device: c.Device = None,
    seed: c.Seed = None,
    force: c.FoldForce = False,
    config: c.Config = None,
    debug: o.Debug = False,
) -> None:
    """Fold every conv/linear -> BN pair; check the folded output before writing it."""
    cli = settings_of(locals())

    def run() -> int:
        from bnaudit.fold.command import run_fold
        from bnaudit.measure.dataflow import METHOD

        done = run_fold(resolve(cli, config, Path.cwd()), output, force=force, log=sys.stderr)
        for pair in done.pairs.pairs:
            out(f"folded {pair.bn} into {pair.conv}\n")
        for bn, why in done.pairs.skipped:
            out(f"not folded {bn}: {why}\n")
        out(
            f"{len(done.pairs.pairs)} pairs (found by {METHOD}); folded output vs "
            f"original: rel L2 {done.rel_l2:.3g}, max abs {done.max_abs:.3g}; wrote {output}\n"
        )
        return EXIT_OK

    raise typer.Exit(guard(run, debug))
