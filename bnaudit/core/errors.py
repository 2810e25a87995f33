"""Typed errors. The library raises them; only the CLI decides how they look to a person."""

from __future__ import annotations


class BnauditError(Exception):
    """An input or usage problem the user can fix; the CLI prints it and exits 2."""


class CheckpointError(BnauditError):
    """The checkpoint cannot be read, is refused as unsafe, or does not fit the model."""


class ModelError(BnauditError):
    """The --model spec cannot be imported, or its factory fails."""


class DataError(BnauditError):
    """The sample batches cannot be read, or the model cannot run on them."""


class ReportError(BnauditError):
    """A report cannot be written where asked."""


class ConfigError(BnauditError):
    """The [tool.bnaudit] configuration is invalid."""


class BaselineError(BnauditError):
    """A baseline file cannot be read, or is not a bnaudit baseline."""


class NothingToAudit(BnauditError):
    """The model has no BatchNorm layer (exit 3)."""


def describe(exc: BaseException) -> str:
    """'TypeName: first line of the message', for one-line error messages."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"
