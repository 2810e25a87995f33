"""A command's parsed parameters as settings keys, the input of `gate.config.resolve`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Parameters named otherwise than their settings key: the key would shadow a builtin (format,
# hash), a module (json), or read as one value (model_args); diff's BASE is the checkpoint.
_RENAMED = {
    "base": "checkpoint",
    "fmt": "format",
    "json_path": "json",
    "hash_file": "hash",
    "model_arg": "model_args",
}
# Parameters that steer a command but are no setting (config: where the settings come from).
_NOT_SETTINGS = frozenset(
    {
        "config",
        "debug",
        "quiet",
        "verbose",
        "wide",
        "layer",
        "layers",
        "output",
        "force",
        "verify",
        "new",
        "key_new",
        "only_changed",
    }
)


def settings_of(params: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a command line gives, by key; None: not on the command line (a flag left
    off included: then the config file or the default decides)."""
    cli = {_RENAMED.get(name, name): value for name, value in params.items()}
    cli = {key: value for key, value in cli.items() if key not in _NOT_SETTINGS}
    if "trust" in cli:
        cli["trust"] = cli["trust"] or None
    if "model_args" in cli:
        cli["model_args"] = tuple(cli["model_args"] or ()) or None
    return cli
