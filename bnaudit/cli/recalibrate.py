"""`bnaudit recalibrate`: a copy of the checkpoint with precise BN statistics, then audited."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from bnaudit.cli import command_options as c
from bnaudit.cli import options as o
from bnaudit.cli.errors import EXIT_FINDINGS, EXIT_OK, guard
from bnaudit.cli.parsed import settings_of
from bnaudit.cli.streams import out
from bnaudit.gate.config import resolve

if TYPE_CHECKING:
    from bnaudit.distributed import Ranks
    from bnaudit.recalibrate.command import Recalibrated


def recalibrate(
    checkpoint: c.Checkpoint,
    output: c.RecalibratedOutput,
    model: c.Model = None,
    model_arg: c.ModelArg = None,
    data: c.RecalibrationData = None,
    input: c.Input = None,
    metric: c.RecalibrationMetric = None,
    regime: c.RecalibrationRegime = None,
    layers: c.Layers = None,
    batch_size: c.BatchSize = None,
    batches: c.Batches = None,
    key: c.Key = None,
    device: c.Device = None,
    autocast: c.RecalibrationAutocast = None,
    seed: c.Seed = None,
    force: c.RecalibrationForce = False,
    verify: c.Verify = True,
    config: c.Config = None,
    debug: o.Debug = False,
) -> None:
    """Write a copy of the checkpoint with precise BN statistics, then audit it."""
    cli = settings_of(locals())
    what = _Recalibration(cli, config, output, force, tuple(layers or ()), verify)
    raise typer.Exit(guard(what.run, debug))


@dataclass(frozen=True)
class _Recalibration:
    """What the command was asked to do; `run` does it, on every rank under torchrun."""

    cli: dict[str, Any]  # settings keys; None: not on the command line
    config: Path | None
    output: Path
    force: bool
    layers: tuple[str, ...]
    verify: bool

    def run(self) -> int:
        from bnaudit import distributed

        with distributed.session() as ranks:
            code = self.run_rank(ranks)
            return code if ranks is None else ranks.agree(code)

    def run_rank(self, ranks: Ranks | None) -> int:
        from bnaudit.recalibrate.command import run_recalibrate
        from bnaudit.report.terminal import Progress, is_terminal

        settings = resolve(self.cli, self.config, Path.cwd())
        leader = ranks is None or ranks.leader
        if ranks is not None:
            settings = ranks.settings(settings)
        bar = Progress(sys.stderr) if leader and is_terminal(sys.stderr) else None
        try:
            done = run_recalibrate(
                settings, self.output, force=self.force, layers=self.layers,
                log=(bar or sys.stderr) if leader else None, verify=self.verify, ranks=ranks,
                progress=bar,
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        if not leader:  # rank 0 wrote the checkpoint and prints the changes
            return EXIT_OK if done.after is None or done.after.passed else EXIT_FINDINGS
        return _print_changes(done, self.output)


def _print_changes(done: Recalibrated, output: Path) -> int:
    """The layers' changes, as audited before and after; the exit code of the audit after."""
    from bnaudit.report.render import render_changes

    if done.before is None or done.after is None:  # --no-verify: nothing audited
        r = done.recalibration
        sys.stdout.write(
            f"wrote {output}: {len(r.stats)} layers recalibrated on {r.batches} batches "
            "(not audited: --no-verify)\n"
        )
        return EXIT_OK
    names = list(done.recalibration.stats)
    out(render_changes(done.before, done.after, names))
    evidence = done.before.impact.evidence if done.before.impact else None
    if evidence is not None:
        out(f"before writing: {evidence.describe()}\n")
    return EXIT_OK if done.after.passed else EXIT_FINDINGS
