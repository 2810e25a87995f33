"""The Typer app: its commands, the root options, and `main`, which maps every outcome to an exit
code (see `cli.errors`)."""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Annotated

import typer

from bnaudit.cli.check import check
from bnaudit.cli.config import config
from bnaudit.cli.diff import diff
from bnaudit.cli.errors import EXIT_ERROR, EXIT_OK
from bnaudit.cli.fold import fold
from bnaudit.cli.recalibrate import recalibrate
from bnaudit.cli.show import show
from bnaudit.cli.streams import error, mute_stdout
from bnaudit.core.version import __version__

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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Audit the BatchNorm layers of PyTorch checkpoints."""


# In this order in `bnaudit --help`.
app.command("check")(check)
app.command("config")(config)
app.command("show")(show)
app.command("recalibrate")(recalibrate)
app.command("fold")(fold)
app.command("diff")(diff)


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
    every exception, KeyboardInterrupt included, into exit 2 in `guard`, so 1 means findings.
    """
    problem = _torch_too_old()
    if problem:
        print(f"bnaudit: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    if sys.stdout is None:  # started with fd 1 closed (`>&-`)
        error("bnaudit: error: stdout is closed; redirect it to a file or to /dev/null")
        sys.exit(EXIT_ERROR)
    try:
        code = _run_app()
    finally:
        try:  # what typer itself printed (help, usage errors)
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            mute_stdout()
            error(f"bnaudit: error: cannot write to stdout ({exc})")
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
        error(f"bnaudit: error: {exc.format_message().rstrip('.')}{hint}")
        return exc.exit_code
    except typer.Abort:
        error("bnaudit: interrupted")
        return EXIT_ERROR
    return code if isinstance(code, int) else EXIT_OK
