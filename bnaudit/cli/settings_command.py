"""The signature `check` and `config` share: every option of the settings, declared once.

`config` shows what a command line of `check` changes, so it takes exactly `check`'s options;
only the checkpoint differs (optional). `settings_command` builds either command around its
action. No `from __future__ import annotations` here: typer reads the annotations at run time,
and the checkpoint's is an argument of the factory, which a string could not name.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from bnaudit.cli import options as o
from bnaudit.cli.errors import guard
from bnaudit.cli.parsed import settings_of


@dataclass(frozen=True)
class Given:
    """What `check` or `config` was given on the command line."""

    settings: Mapping[str, Any]  # settings keys; None: not on the command line
    config: Path | None
    debug: bool
    quiet: bool
    verbose: bool
    wide: bool

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> "Given":
        """From the command's parameters, by name."""
        return cls(
            settings_of(params),
            config=params["config"],
            debug=params["debug"],
            quiet=params["quiet"],
            verbose=params["verbose"],
            wide=params["wide"],
        )


def settings_command(
    action: Callable[[Given], int], checkpoint_type: Any, checkpoint_default: Any
) -> Callable[..., None]:
    """A command with every option of the settings that runs `action` under `guard`; its help
    is the action's docstring. The checkpoint argument is `checkpoint_type` (an `Annotated`
    alias) with `checkpoint_default` (`...`: required)."""

    def command(
        checkpoint: checkpoint_type = checkpoint_default,
        against: o.Against = None,
        key: o.Key = None,
        model: o.Model = None,
        model_arg: o.ModelArg = None,
        data: o.Data = None,
        image_size: o.ImageSize = None,
        mean: o.Mean = None,
        std: o.Std = None,
        input: o.Input = None,
        metric: o.Metric = None,
        input_shape: o.InputShape = None,
        batch_size: o.BatchSize = None,
        batches: o.Batches = None,
        device: o.Device = None,
        autocast: o.AutocastDtype = None,
        seed: o.Seed = None,
        steps_per_epoch: o.StepsPerEpoch = None,
        accumulate: o.Accumulate = None,
        train_mode: o.TrainModePass = None,
        trust: o.Trust = False,
        hash_file: o.Hash = None,
        fmt: o.StdoutFormat = None,
        markdown: o.Markdown = None,
        csv: o.Csv = None,
        json_path: o.Json = None,
        html: o.Html = None,
        junit: o.Junit = None,
        quiet: o.Quiet = False,
        verbose: o.Verbose = False,
        wide: o.Wide = False,
        fail_on: o.FailOnSeverity = None,
        impact: o.Impact = None,
        regime: o.ImpactRegime = None,
        attribution: o.Attribution = None,
        max_output_change: o.MaxOutputChange = None,
        baseline: o.Baseline = None,
        write_baseline: o.WriteBaseline = None,
        baseline_margin: o.BaselineMargin = None,
        github: o.GitHubActions = None,
        max_annotations: o.MaxAnnotations = None,
        max_error_ratio: o.MaxErrorRatio = None,
        stale_shift: o.StaleShift = None,
        stale_log_var: o.StaleLogVar = None,
        stale_z: o.StaleZ = None,
        stale_fraction: o.StaleFraction = None,
        stale_alpha: o.StaleAlpha = None,
        min_batch: o.MinBatch = None,
        var_bias_scale: o.VarBiasScale = None,
        max_amplification: o.MaxAmplification = None,
        max_init_weight: o.MaxInitWeight = None,
        keras_momentum: o.KerasMomentum = None,
        config: o.Config = None,
        debug: o.Debug = False,
    ) -> None:
        params = dict(locals())
        del params["action"]  # the closure's one free name: locals() holds it too
        given = Given.parse(params)
        raise typer.Exit(guard(lambda: action(given), given.debug))

    command.__doc__ = action.__doc__
    return command
