"""The `bnaudit` command: parses options, calls the library, maps errors to exit codes.

Exit codes: 0 passed, 1 a finding at or above --fail-on that is neither ignored nor baselined,
2 usage/input/internal error, 3 nothing to audit. An unhandled exception never exits 1.
"""

from __future__ import annotations

import errno
import importlib.metadata
import inspect
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from bnaudit.checkpoint import digest
from bnaudit.core.errors import BnauditError, NothingToAudit, ReportError
from bnaudit.core.untrusted import middle_cut, one_line
from bnaudit.core.version import __version__
from bnaudit.gate.config import Regime, TrainMode, hash_skipped, resolve
from bnaudit.inputs.precision import Autocast
from bnaudit.report.github import GitHub
from bnaudit.report.render import Format
from bnaudit.report.table import DEFAULT_WIDTH
from bnaudit.verdict.results import FailOn

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR, EXIT_NOTHING = 0, 1, 2, 3
MIN_TORCH = (2, 10)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Audit the BatchNorm layers of PyTorch checkpoints.",
    # Plain help text: Rich markup would swallow every "[default: ...]" as a markup tag.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_T = "Thresholds"
_O = "Output impact"
_R = "Reports"
_I = "Inputs"
_G = "Gate"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        callback=_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Audit the BatchNorm layers of PyTorch checkpoints."""


@app.command()
def check(
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint to audit (only read, never changed).", show_default=False
    ),
    key: str = typer.Option(
        None,
        "--key",
        "-k",
        rich_help_panel=_I,
        help="Which state dict of a checkpoint dict to audit, e.g. state_dict_ema (nested: "
        "ema.module; in a flat state dict: a key prefix) [default: the first of state_dict, "
        "model_state_dict, model, module, net, network, then the EMA keys].",
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        rich_help_panel=_I,
        help="Architecture: timm:NAME, torchvision:NAME (built without pretrained weights: "
        "the checkpoint has them), path/to/file.py:factory or package.module:factory.",
    ),
    model_arg: list[str] = typer.Option(
        None,
        "--model-arg",
        metavar="NAME=VALUE",
        rich_help_panel=_I,
        help="Keyword argument of the --model factory, VALUE a Python literal "
        "(repeatable), e.g. --model-arg num_classes=10.",
    ),
    data: str = typer.Option(
        None,
        "--data",
        "-d",
        rich_help_panel=_I,
        help="Sample batches: a folder of images (decoded by Pillow: pip install pillow), "
        ".pt/.pth, .npy, .npz, or path/to/file.py:function / module:function returning batches "
        "(a DataLoader, say).",
    ),
    image_size: int = typer.Option(
        None,
        rich_help_panel=_I,
        help="Images: center crop size (default: timm's data config, else 224).",
    ),
    mean: str = typer.Option(
        None,
        rich_help_panel=_I,
        help="Images: per-channel mean, e.g. 0.5,0.5,0.5 (default: timm's data config, else "
        "ImageNet's 0.485,0.456,0.406).",
    ),
    std: str = typer.Option(
        None,
        rich_help_panel=_I,
        help="Images: per-channel std (default: timm's data config, else ImageNet's "
        "0.229,0.224,0.225).",
    ),
    input: str = typer.Option(
        None,
        "--input",
        rich_help_panel=_I,
        help="Which part of a batch is the model's input: an element index (0 for "
        "(images, labels)), a dict key, or '*' for every element [default: model(*batch) "
        "when the forward requires every element, else batch[0]; dicts: model(**batch)].",
    ),
    metric: str = typer.Option(
        None,
        "--metric",
        rich_help_panel=_O,
        help="Task metric for labelled batches: file.py:fn or module:fn, fn(outputs, labels) -> "
        "float, higher is better [default: top-1 accuracy for [B, K] outputs].",
    ),
    input_shape: str = typer.Option(
        None,
        rich_help_panel=_I,
        help="Synthetic N(0,1) batches of this shape, e.g. "
        "8x3x224x224; data-dependent verdicts are not drawn.",
    ),
    batch_size: int = typer.Option(
        None,
        rich_help_panel=_I,
        help="Split a single data tensor into batches of this size "
        "[default: 32]; use the training batch size where known.",
    ),
    batches: int = typer.Option(
        None, rich_help_panel=_I, help="Use at most this many batches [default: all]."
    ),
    device: str = typer.Option(
        None,
        rich_help_panel=_I,
        help="Device: cpu, cuda, cuda:1, ... (under torchrun, cuda is cuda:LOCAL_RANK) "
        "[default: cpu].",
    ),
    autocast: Autocast = typer.Option(
        None,
        rich_help_panel=_I,
        help="Run the forward under torch.autocast in this dtype, as deployed [default: off].",
    ),
    seed: int = typer.Option(None, rich_help_panel=_I, help="Random seed [default: 0]."),
    train_mode: TrainMode = typer.Option(
        None,
        rich_help_panel=_I,
        help="Train-mode pass: only BN layers (bn) or the whole model (all) [default: bn].",
    ),
    trust: bool = typer.Option(
        False,
        "--trust",
        rich_help_panel=_I,
        help="Allow pickled objects (a whole nn.Module), TorchScript and torch.export files: "
        "this RUNS CODE from the file.",
    ),
    hash_file: bool = typer.Option(
        None,
        "--hash/--no-hash",
        rich_help_panel=_R,
        help="Compute the checkpoint's SHA-256 for the reports [default: when a report file, "
        "--format other than table, --model or GitHub Actions needs it].",
    ),
    fmt: Format = typer.Option(
        None, "--format", "-f", rich_help_panel=_R, help="What goes to stdout [default: table]."
    ),
    markdown: Path = typer.Option(None, rich_help_panel=_R, help="Write a markdown report."),
    csv: Path = typer.Option(
        None, rich_help_panel=_R, help="Write a CSV report (a row per layer)."
    ),
    json_path: Path = typer.Option(None, "--json", rich_help_panel=_R, help="Write a JSON report."),
    html: Path = typer.Option(
        None,
        rich_help_panel=_R,
        help="Write a self-contained HTML report (charts, sortable table).",
    ),
    junit: Path = typer.Option(
        None, rich_help_panel=_R, help="Write JUnit XML: a test case per layer."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", rich_help_panel=_R, help="Print only the verdict line."
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        rich_help_panel=_R,
        help="List every finding with its message, not one line per code.",
    ),
    wide: bool = typer.Option(
        False,
        "--wide",
        rich_help_panel=_R,
        help="Show every column, names in full [default: fit the terminal, COLUMNS or 80].",
    ),
    fail_on: FailOn = typer.Option(
        None,
        rich_help_panel=_G,
        help="Exit 1 on findings of this severity or worse [default: fail].",
    ),
    impact: bool = typer.Option(
        None,
        "--impact/--no-impact",
        rich_help_panel=_O,
        help="Measure how recalibrated statistics change the eval output [default: on].",
    ),
    regime: Regime = typer.Option(
        None,
        rich_help_panel=_O,
        help="Recalibrate from train-mode inputs, or eval-mode inputs layer after layer "
        "[default: train].",
    ),
    attribution: bool = typer.Option(
        None,
        "--attribution/--no-attribution",
        rich_help_panel=_O,
        help="Also recalibrate each flagged layer alone (8 at most, a pass per batch each) "
        "[default: off].",
    ),
    max_output_change: float = typer.Option(
        None,
        rich_help_panel=_T,
        help="Fail when recalibration changes the output by more (relative L2) [default: off].",
    ),
    baseline: Path = typer.Option(
        None,
        rich_help_panel=_G,
        help="Fail only on findings that are new or worse than in this baseline file.",
    ),
    write_baseline: Path = typer.Option(
        None,
        rich_help_panel=_G,
        help="Record the current findings in this baseline file (and pass on them).",
    ),
    baseline_margin: float = typer.Option(
        None,
        rich_help_panel=_G,
        help="A baselined finding is worse when its value grows by more than this fraction "
        "[default: 0.1].",
    ),
    github: GitHub = typer.Option(
        None,
        rich_help_panel=_G,
        help="GitHub Actions annotations and step summary [default: auto, on when "
        "GITHUB_ACTIONS=true].",
    ),
    max_annotations: int = typer.Option(
        None, rich_help_panel=_G, help="At most this many annotations [default: 10]."
    ),
    max_error_ratio: float = typer.Option(
        None, rich_help_panel=_T, help="Reconstruction error / tolerance [default: 1]."
    ),
    stale_shift: float = typer.Option(
        None, rich_help_panel=_T, help="Mean shift in running sds [default: 0.3]."
    ),
    stale_log_var: float = typer.Option(
        None, rich_help_panel=_T, help="|ln variance ratio| [default: 0.4]."
    ),
    stale_z: float = typer.Option(
        None, rich_help_panel=_T, help="Sds of sample noise + EMA jitter [default: 4]."
    ),
    stale_fraction: float = typer.Option(
        None,
        rich_help_panel=_T,
        help="Fraction of channels (and at least 2) for a layer verdict [default: 0.1].",
    ),
    stale_alpha: float = typer.Option(
        None,
        rich_help_panel=_T,
        help="And a count of off channels noise alone reaches less often [default: 0.001].",
    ),
    min_batch: int = typer.Option(
        None, rich_help_panel=_T, help="Smallest batch for a stale verdict [default: 3]."
    ),
    var_bias_scale: float = typer.Option(
        None, rich_help_panel=_T, help="1 - sqrt((N-1)/N) above this warns [default: 0.02]."
    ),
    max_amplification: float = typer.Option(
        None, rich_help_panel=_T, help="|gamma|/sqrt(var+eps) [default: 1000]."
    ),
    max_init_weight: float = typer.Option(
        None, rich_help_panel=_T, help="(1-m)^T of the initial values [default: 0.05]."
    ),
    keras_momentum: float = typer.Option(
        None,
        rich_help_panel=_T,
        help="Momentum at or above this is likely a Keras value [default: 0.5].",
    ),
    config: Path = typer.Option(
        None,
        help="TOML file with a [tool.bnaudit] table [default: pyproject.toml from here upward].",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Audit every BatchNorm layer: reconstruction, stale stats, variance bias, momentum."""
    cli = _cli_settings(locals())
    width = None if wide else shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    code = _guard(lambda: _check(cli, config, quiet, width=width, verbose=verbose), debug)
    raise typer.Exit(code)


def _cli_settings(params: dict[str, Any]) -> dict[str, Any]:
    """`check`'s parameters as settings keys (None: not given on the command line)."""
    cli = dict(params)
    for key in ("config", "debug", "quiet", "verbose", "wide"):
        cli.pop(key, None)
    cli["format"] = cli.pop("fmt")
    cli["json"] = cli.pop("json_path")
    cli["hash"] = cli.pop("hash_file")
    cli["trust"] = cli["trust"] or None
    cli["model_args"] = tuple(cli.pop("model_arg") or ()) or None
    return cli


def _config(**params: Any) -> None:
    """Print the effective settings of `check` and where each came from."""
    cli = _cli_settings(params)
    raise typer.Exit(_guard(lambda: _show_config(cli, params["config"]), params["debug"]))


# `bnaudit config` takes exactly the options of `bnaudit check` (so that it can show what a
# command line changes), with the checkpoint optional: its signature is `check`'s, not a copy.
_check_signature = inspect.signature(check, eval_str=True)
_config.__signature__ = _check_signature.replace(  # type: ignore[attr-defined]
    parameters=[
        p.replace(default=typer.Argument(None, help="Checkpoint (optional).", show_default=False))
        if p.name == "checkpoint"
        else p
        for p in _check_signature.parameters.values()
    ]
)
app.command("config")(_config)


def _show_config(cli: dict[str, Any], config: Path | None) -> int:
    from bnaudit.gate.config import render_settings, resolve_with_sources

    given = cli["checkpoint"] is not None
    if not given:  # the settings need one; it is shown as not set
        cli = {**cli, "checkpoint": Path("-")}
    settings, sources = resolve_with_sources(cli, config, Path.cwd())
    unset = frozenset() if given else frozenset({"checkpoint"})
    _out(render_settings(settings, sources, unset=unset))
    return EXIT_OK


# Options that show, recalibrate, fold and diff declare alike (check has its own, longer help).
_CHECKPOINT = typer.Argument(..., help="Checkpoint (only read).", show_default=False)
_MODEL = typer.Option(None, "--model", "-m", help="Architecture, as for check.")
_MODEL_ARG = typer.Option(
    None,
    "--model-arg",
    metavar="NAME=VALUE",
    help="Argument of the --model factory, as for check (repeatable).",
)
_INPUT = typer.Option(None, "--input", help="Input element or key of a batch, as for check.")
_BATCH_SIZE = typer.Option(None, help="Split a data tensor into batches of this size.")
_BATCHES = typer.Option(None, help="Use at most this many batches.")
_KEY = typer.Option(None, help="Which state dict of the checkpoint, as for check.")
_DEVICE = typer.Option(None, help="Device [default: cpu].")
_SEED = typer.Option(None, help="Random seed [default: 0].")
_CONFIG = typer.Option(None, help="TOML file with a [tool.bnaudit] table.")
_DEBUG = typer.Option(False, "--debug", help="Show tracebacks.")


@app.command()
def show(
    checkpoint: Path = _CHECKPOINT,
    layer: str = typer.Option(..., "--layer", "-l", help="Qualified name, e.g. layer1.0.bn1."),
    model: str = _MODEL,
    model_arg: list[str] = _MODEL_ARG,
    data: str = typer.Option(None, "--data", "-d", help="Sample batches: measure the errors."),
    input: str = _INPUT,
    input_shape: str = typer.Option(None, help="Synthetic batches of this shape."),
    batch_size: int = _BATCH_SIZE,
    batches: int = _BATCHES,
    device: str = _DEVICE,
    seed: int = _SEED,
    trust: bool = typer.Option(False, "--trust", help="Allow a pickled nn.Module (runs code)."),
    config: Path = _CONFIG,
    debug: bool = _DEBUG,
) -> None:
    """Explain one layer: attributes, exact train/eval formulas, runnable code, errors."""
    cli = dict(locals())
    for key in ("config", "debug", "layer"):
        cli.pop(key)
    cli["trust"] = trust or None
    cli["model_args"] = tuple(cli.pop("model_arg") or ()) or None
    raise typer.Exit(_guard(lambda: _show(cli, config, layer), debug))


@app.command()
def recalibrate(
    checkpoint: Path = _CHECKPOINT,
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the new checkpoint."),
    model: str = _MODEL,
    model_arg: list[str] = _MODEL_ARG,
    data: str = typer.Option(None, "--data", "-d", help="Sample batches to recalibrate on."),
    input: str = _INPUT,
    metric: str = typer.Option(
        None, "--metric", help="Task metric for labelled batches, as for check [default: top-1]."
    ),
    regime: Regime = typer.Option(
        None, help="Statistics of train-mode inputs, or of eval-mode inputs [default: train]."
    ),
    layers: list[str] = typer.Option(
        None,
        "--layers",
        metavar="GLOB",
        help="Only layers matching this glob (repeatable) [default: all].",
    ),
    batch_size: int = _BATCH_SIZE,
    batches: int = _BATCHES,
    key: str = _KEY,
    device: str = _DEVICE,
    autocast: Autocast = typer.Option(
        None, help="Run the forward under torch.autocast, as for check [default: off]."
    ),
    seed: int = _SEED,
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace an existing output file, and write even when the labelled batches show "
        "that recalibration lowers the task metric.",
    ),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="Audit before and after (and refuse when labelled batches show a lower task "
        "metric); --no-verify: the statistics pass alone, the cost of update_bn.",
    ),
    config: Path = _CONFIG,
    debug: bool = _DEBUG,
) -> None:
    """Write a copy of the checkpoint with precise BN statistics, then audit it."""
    cli = {
        "checkpoint": checkpoint,
        "model": model,
        "model_args": tuple(model_arg or ()) or None,
        "data": data,
        "input": input,
        "metric": metric,
        "regime": regime,
        "batch_size": batch_size,
        "batches": batches,
        "key": key,
        "device": device,
        "autocast": autocast,
        "seed": seed,
    }

    def run() -> int:
        from bnaudit import distributed

        with distributed.session() as ranks:
            code = run_rank(ranks)
            return code if ranks is None else ranks.agree(code)

    def run_rank(ranks: Any) -> int:
        from bnaudit.recalibrate.command import run_recalibrate
        from bnaudit.report.render import render_changes
        from bnaudit.report.terminal import Progress, is_terminal

        settings = resolve(cli, config, Path.cwd())
        leader = ranks is None or ranks.leader
        if ranks is not None:
            settings = ranks.settings(settings)
        bar = Progress(sys.stderr) if leader and is_terminal(sys.stderr) else None
        try:
            done = run_recalibrate(
                settings, output, force=force, layers=tuple(layers or ()),
                log=(bar or sys.stderr) if leader else None, verify=verify, ranks=ranks,
                progress=bar,
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        if not leader:  # rank 0 wrote the checkpoint and prints the changes
            return EXIT_OK if done.after is None or done.after.passed else EXIT_FINDINGS
        if done.before is None or done.after is None:  # --no-verify: nothing audited
            r = done.recalibration
            sys.stdout.write(
                f"wrote {output}: {len(r.stats)} layers recalibrated on {r.batches} batches "
                "(not audited: --no-verify)\n"
            )
            return EXIT_OK
        names = list(done.recalibration.stats)
        _out(render_changes(done.before, done.after, names))
        evidence = done.before.impact.evidence if done.before.impact else None
        if evidence is not None:
            _out(f"before writing: {evidence.describe()}\n")
        return EXIT_OK if done.after.passed else EXIT_FINDINGS

    raise typer.Exit(_guard(run, debug))


@app.command()
def fold(
    checkpoint: Path = _CHECKPOINT,
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the folded model."),
    model: str = _MODEL,
    model_arg: list[str] = _MODEL_ARG,
    data: str = typer.Option(None, "--data", "-d", help="Batches to check the folded model on."),
    input: str = _INPUT,
    input_shape: str = typer.Option(None, help="Synthetic batches of this shape instead."),
    batch_size: int = _BATCH_SIZE,
    batches: int = _BATCHES,
    key: str = _KEY,
    device: str = _DEVICE,
    seed: int = _SEED,
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    config: Path = _CONFIG,
    debug: bool = _DEBUG,
) -> None:
    """Fold every conv/linear -> BN pair; check the folded output before writing it."""
    cli = {
        "checkpoint": checkpoint,
        "model": model,
        "model_args": tuple(model_arg or ()) or None,
        "data": data,
        "input": input,
        "input_shape": input_shape,
        "batch_size": batch_size,
        "batches": batches,
        "key": key,
        "device": device,
        "seed": seed,
    }

    def run() -> int:
        from bnaudit.fold.command import run_fold
        from bnaudit.measure.dataflow import METHOD

        done = run_fold(resolve(cli, config, Path.cwd()), output, force=force, log=sys.stderr)
        for pair in done.pairs.pairs:
            _out(f"folded {pair.bn} into {pair.conv}\n")
        for bn, why in done.pairs.skipped:
            _out(f"not folded {bn}: {why}\n")
        _out(
            f"{len(done.pairs.pairs)} pairs (found by {METHOD}); folded output vs "
            f"original: rel L2 {done.rel_l2:.3g}, max abs {done.max_abs:.3g}; wrote {output}\n"
        )
        return EXIT_OK

    raise typer.Exit(_guard(run, debug))


@app.command()
def diff(
    base: Path = typer.Argument(..., help="Checkpoint before (only read).", show_default=False),
    new: Path = typer.Argument(..., help="Checkpoint after (only read).", show_default=False),
    key: str = typer.Option(None, "--key", "-k", help="Which state dict of BASE, as for check."),
    key_new: str = typer.Option(
        None, "--key-new", help="Which state dict of NEW (default: the --key of BASE)."
    ),
    model: str = typer.Option(
        None, "--model", "-m", help="Architecture, as for check: upstream from its dataflow."
    ),
    trust: bool = typer.Option(
        False, "--trust", help="Allow pickled objects, TorchScript, torch.export (runs code)."
    ),
    fmt: Format = typer.Option(
        None, "--format", "-f", help="What goes to stdout (default: table)."
    ),
    markdown: Path = typer.Option(None, help="Write a markdown report."),
    csv: Path = typer.Option(None, help="Write a CSV report (a row per layer)."),
    json_path: Path = typer.Option(None, "--json", help="Write a JSON report."),
    html: Path = typer.Option(None, help="Write a self-contained HTML report."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the summary line."),
    only_changed: bool = typer.Option(
        False, "--only-changed", help="Leave out layers where nothing changed or was found."
    ),
    fail_on: FailOn = typer.Option(
        None, help="Exit 1 on findings of this severity (default: fail)."
    ),
    baseline: Path = typer.Option(None, help="Fail only on findings new or worse than this."),
    write_baseline: Path = typer.Option(None, help="Record the findings in this baseline."),
    baseline_margin: float = typer.Option(None, help="Baseline value margin (default: 0.1)."),
    config: Path = _CONFIG,
    debug: bool = _DEBUG,
) -> None:
    """What changed in the BatchNorm state between two checkpoints, without data."""
    cli = {
        "checkpoint": base,
        "key": key,
        "model": model,
        "trust": trust or None,
        "format": fmt,
        "markdown": markdown,
        "csv": csv,
        "json": json_path,
        "html": html,
        "fail_on": fail_on,
        "baseline": baseline,
        "write_baseline": write_baseline,
        "baseline_margin": baseline_margin,
    }

    def run() -> int:
        import shutil

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
            else render(
                report, settings.format, color=color, width=width, only_changed=only_changed
            )
        )
        sys.stdout.write(text)
        return EXIT_OK if report.passed else EXIT_FINDINGS

    raise typer.Exit(_guard(run, debug))


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
    _out(render_layer(describe(p.model, layer, result)))
    return EXIT_OK


def _check(
    cli: dict[str, Any], config: Path | None, quiet: bool, *, width: int | None, verbose: bool
) -> int:
    if isinstance(cli.get("checkpoint"), Path):
        settings = resolve(cli, config, Path.cwd())  # no torch yet: it imports in run_check
        if hash_skipped(settings, os.environ) is None:
            digest.prefetch(settings.checkpoint)  # hashes while torch imports
    from bnaudit import distributed

    # Under torchrun every rank runs this; rank 0 alone writes reports and stdout, and every
    # rank returns rank 0's exit code, or 2 with the message of a rank that failed.
    with distributed.session() as ranks:
        code = _check_rank(cli, config, quiet, ranks, width=width, verbose=verbose)
        return code if ranks is None else ranks.agree(code)


def _check_rank(
    cli: dict[str, Any],
    config: Path | None,
    quiet: bool,
    ranks: Any,
    *,
    width: int | None,
    verbose: bool,
) -> int:
    from bnaudit.check.run import run_check, write_reports
    from bnaudit.report import github as annotations
    from bnaudit.report.render import render, summary_line
    from bnaudit.report.terminal import Progress, color_enabled, is_terminal

    settings = resolve(cli, config, Path.cwd())
    follower = ranks is not None and not ranks.leader
    if ranks is not None:
        settings = ranks.settings(settings)  # its device; no report files but on rank 0
        quiet = quiet or follower
    bar = Progress(sys.stderr) if not quiet and is_terminal(sys.stderr) else None
    try:
        log = None if quiet else bar or sys.stderr  # a log line does not run into the bar
        report = run_check(settings, log=log, progress=bar, ranks=ranks)
    except NothingToAudit as exc:
        _error(f"bnaudit: nothing to audit: {exc}")
        return EXIT_NOTHING
    finally:
        if bar is not None:
            bar.close()
    write_reports(report, settings)
    if follower:  # rank 0 prints the report
        return EXIT_OK if report.passed else EXIT_FINDINGS
    color = color_enabled(sys.stdout, os.environ)
    text = (
        summary_line(report, color) + "\n"
        if quiet
        else render(report, settings.format, color=color, width=width, verbose=verbose)
    )
    if settings.github.enabled(os.environ):
        text = annotations.for_github(
            text, report, limit=settings.max_annotations, environ=os.environ
        )
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary and not annotations.append_step_summary(report, Path(summary)):
            _error(f"bnaudit: {summary}: the step summary is full; not appended")
    _out(text)
    return EXIT_OK if report.passed else EXIT_FINDINGS


def _guard(action: Callable[[], int], debug: bool) -> int:
    """Run `action`; every exception becomes a one-line message and exit 2."""
    try:
        return action()
    except BnauditError as exc:
        if debug:
            traceback.print_exc()
        _error(f"bnaudit: error: {exc}")
    except KeyboardInterrupt:
        _error("bnaudit: interrupted")
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _error(
            f"bnaudit: internal error: {type(exc).__name__}: {exc}; rerun with --debug "
            "for the traceback"
        )
    return EXIT_ERROR


def _error(message: str) -> None:
    """An error on stderr, one line whatever it quotes (escaped, cut); under GitHub Actions
    also an annotation, and guarded: messages quote names from the checkpoint."""
    line = one_line(message)
    try:
        if os.environ.get("GITHUB_ACTIONS") != "true":
            sys.stderr.write(line + "\n")
        else:
            from bnaudit.report import github as annotations

            guarded = annotations.guard(line, annotations.new_token())
            # The annotation escapes line breaks its own way (%0A): only cut and made encodable.
            text = middle_cut(message.encode("utf-8", "backslashreplace").decode("utf-8"))
            error = annotations.command("error", text, title="bnaudit")
            sys.stderr.write(guarded + error + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # stderr closed or full: the exit code is all that is left to say it


def _out(text: str) -> None:
    """Write to stdout now: a closed or full stdout (`> /dev/full`) is this run's error, exit 2
    with one line, not a traceback when Python flushes at exit."""
    try:
        if sys.stdout is None:
            raise OSError(errno.EBADF, "stdout is closed")
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        _mute_stdout()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ReportError(
            f"cannot write to stdout ({why}); redirect it to a file with room, or to /dev/null"
        ) from None


def _mute_stdout() -> None:
    """Point fd 1 at /dev/null, so that what is still buffered cannot fail again at exit."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass


def _torch_too_old() -> str | None:
    """From the installed metadata: importing torch here would delay every command by its import
    time, which `check` overlaps with hashing the checkpoint."""
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a source build without metadata
        import torch

        installed = torch.__version__
    parts = installed.split("+")[0].split(".")
    try:
        version = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        return None
    if version < MIN_TORCH:
        return (
            f"torch {installed} is too old: torch < 2.10 has known weights_only "
            "bypasses (CVE-2025-32434, CVE-2026-24747) that let a checkpoint run code; "
            "upgrade torch"
        )
    return None


def main() -> None:
    """Console-script entry point.

    Usage errors exit 2 (typer's own handling); the command itself returns 0/1/2/3 and turns
    every exception, KeyboardInterrupt included, into exit 2 in `_guard`, so 1 means findings.
    """
    problem = _torch_too_old()
    if problem:
        print(f"bnaudit: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    if sys.stdout is None:  # started with fd 1 closed (`>&-`)
        _error("bnaudit: error: stdout is closed; redirect it to a file or to /dev/null")
        sys.exit(EXIT_ERROR)
    try:
        code = _run_app()
    finally:
        try:  # what typer itself printed (help, usage errors)
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            _mute_stdout()
            _error(f"bnaudit: error: cannot write to stdout ({exc})")
            sys.exit(EXIT_ERROR)
    sys.exit(code)


def _run_app() -> int:
    """The typer app, with its usage errors as bnaudit's own one line (they quote option values,
    which may come from a file: a skip list, a key) instead of a multi-line box."""
    from typer._click import exceptions  # typer's vendored click: what usage errors raise

    try:
        code = app(standalone_mode=False)
    except exceptions.NoArgsIsHelpError as exc:  # `bnaudit` alone: the help, as typer shows it
        typer.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        return EXIT_ERROR
    except exceptions.ClickException as exc:
        hint = f"; see `{exc.ctx.command_path} --help`" if getattr(exc, "ctx", None) else ""
        _error(f"bnaudit: error: {exc.format_message().rstrip('.')}{hint}")
        return exc.exit_code
    except typer.Abort:
        _error("bnaudit: interrupted")
        return EXIT_ERROR
    return code if isinstance(code, int) else EXIT_OK
