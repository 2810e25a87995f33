"""Settings of `bnaudit check`: defaults, then [tool.bnaudit], then the command line.

The table is read from `--config PATH` or from the first pyproject.toml found from the working
directory upward. Unknown keys are an error that names the key: a typo must not silently
disable a check. Relative paths in the file are relative to the file's folder. Every resolved
value remembers where it came from, which `bnaudit config` prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnaudit.core.errors import ConfigError
from bnaudit.gate.baseline import DEFAULT_MARGIN
from bnaudit.gate.ignores import Ignore, parse_ignores
from bnaudit.inputs.precision import Autocast
from bnaudit.report.github import DEFAULT_MAX_ANNOTATIONS, GitHub
from bnaudit.report.render import Format
from bnaudit.verdict.findings import Thresholds
from bnaudit.verdict.results import FailOn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class TrainMode(str, enum.Enum):
    """Which modules the train-mode pass puts in train mode."""

    BN = "bn"  # only the BN layers: dropout and friends stay off, the audit is deterministic
    ALL = "all"  # the whole model, as in training


class Regime(str, enum.Enum):
    """Which inputs recalibrated statistics describe (see bnaudit.measure.impact)."""

    TRAIN = "train"  # train-mode inputs: what a running average converges to
    EVAL = "eval"  # eval-mode inputs, layer after layer: what the deployed model sees


@dataclass(frozen=True)
class CheckSettings:
    checkpoint: Path
    against: Path | None = None  # the checkpoint a deployed artifact (`checkpoint`) came from
    key: str | None = None  # which state dict in a checkpoint dict
    model: str | None = None
    model_args: tuple[str, ...] = ()  # NAME=VALUE keyword arguments of the --model factory
    data: str | None = None
    # For a folder of images (bnaudit.inputs.images); None: timm's data config, else the defaults.
    image_size: int | None = None  # the center crop
    mean: str | None = None  # per channel, "0.485,0.456,0.406"
    std: str | None = None
    input: str | None = None  # which element or key of a batch is the model's input
    metric: str | None = None  # module:fn(outputs, labels) -> float, for labelled batches
    input_shape: str | None = None
    batch_size: int = 32
    batches: int | None = None
    device: str = "cpu"
    autocast: Autocast = Autocast.OFF  # the forward under torch.autocast (bnaudit.inputs.precision)
    seed: int = 0
    # A training checkpoint's counters against its step count (bnaudit.verdict.counters).
    steps_per_epoch: int | None = None  # when the checkpoint holds an epoch, not a step
    accumulate: int = 1  # forward micro-batches per optimizer step
    train_mode: TrainMode = TrainMode.BN
    trust: bool = False
    hash: bool | None = None  # the checkpoint's SHA-256; None: when a report needs it (digest)
    format: Format = Format.TABLE
    markdown: Path | None = None
    csv: Path | None = None
    json: Path | None = None
    html: Path | None = None
    junit: Path | None = None
    fail_on: FailOn = FailOn.FAIL
    impact: bool = True
    regime: Regime = Regime.TRAIN
    attribution: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)
    ignore: tuple[Ignore, ...] = ()
    baseline: Path | None = None
    write_baseline: Path | None = None
    baseline_margin: float = DEFAULT_MARGIN
    github: GitHub = GitHub.AUTO
    max_annotations: int = DEFAULT_MAX_ANNOTATIONS
    config_file: Path | None = None


# Where a resolved value came from, besides the path of the config file.
DEFAULT = "default"
COMMAND_LINE = "command line"

# Keys the command line may take but a config file may not: trusting a file runs its code, and
# that decision belongs to the person running the command, not to a file in the repository;
# writing the baseline on every run would accept every new finding.
CLI_ONLY = frozenset({"checkpoint", "against", "trust", "write_baseline", "config_file"})
_PATHS = {"markdown", "csv", "json", "html", "junit", "baseline"}
_THRESHOLDS = {f.name: f for f in dataclasses.fields(Thresholds)}
_SETTINGS = {f.name for f in dataclasses.fields(CheckSettings)}
_ENUMS: dict[str, type[enum.Enum]] = {
    "format": Format,
    "fail_on": FailOn,
    "train_mode": TrainMode,
    "regime": Regime,
    "github": GitHub,
    "autocast": Autocast,
}
_KINDS = {
    "batch_size": "int",
    "image_size": "int",
    "batches": "int",
    "seed": "int",
    "steps_per_epoch": "int",
    "accumulate": "int",
    "max_annotations": "int",
    "baseline_margin": "float",
    "impact": "bool",
    "attribution": "bool",
    "hash": "bool",
}


def find_pyproject(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def read_table(path: Path, *, required: bool) -> dict[str, Any]:
    """The [tool.bnaudit] table of a TOML file ({} when absent and not `required`)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
    # A dedicated --config file may hold the table at the top level or under [tool.bnaudit].
    table = data.get("tool", {}).get("bnaudit")
    if table is None and required and path.name != "pyproject.toml":
        table = data
    if table is None:
        if required:
            raise ConfigError(f"{path}: no [tool.bnaudit] table")
        return {}
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [tool.bnaudit] must be a table")
    return table


def resolve(cli: dict[str, Any], config: Path | None, cwd: Path) -> CheckSettings:
    """Merge defaults, the config file and the command line (which wins)."""
    return resolve_with_sources(cli, config, cwd)[0]


def resolve_with_sources(
    cli: dict[str, Any], config: Path | None, cwd: Path
) -> tuple[CheckSettings, dict[str, str]]:
    """The settings, and for every key (settings and thresholds) where its value came from:
    `DEFAULT`, the config file's path, or `COMMAND_LINE`."""
    path = config if config is not None else find_pyproject(cwd)
    table = read_table(path, required=config is not None) if path is not None else {}
    values: dict[str, Any] = {}
    thresholds: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for raw_key, raw in table.items():
        key = raw_key.replace("-", "_")
        if key in _THRESHOLDS:
            thresholds[key] = _coerce(raw, _THRESHOLDS[key].type, raw_key, path)
        elif key in _SETTINGS and key not in CLI_ONLY and key != "thresholds":
            values[key] = _from_file(key, raw, raw_key, path)
        else:
            raise ConfigError(
                f"{path}: unknown key {raw_key!r} in [tool.bnaudit]{_nearest(key)}; see "
                "`bnaudit check --help` for the option names"
            )
        sources[key] = str(path)
    for key, value in cli.items():
        if value is None:
            continue
        if key in _THRESHOLDS:
            thresholds[key] = value
        else:
            values[key] = value
        sources[key] = COMMAND_LINE
    try:
        threshold_obj = Thresholds().replace(**thresholds)
    except TypeError as exc:  # pragma: no cover - keys were checked above
        raise ConfigError(str(exc)) from exc
    values["config_file"] = path
    settings = CheckSettings(thresholds=threshold_obj, **values)
    _validate(settings, sources)
    every = [k for k in _SETTINGS if k not in ("thresholds", "config_file")] + list(_THRESHOLDS)
    return settings, {k: sources.get(k, DEFAULT) for k in every}


def _nearest(key: str) -> str:
    """` (did you mean 'stale-shift'?)` for a misspelt key, "" when nothing is close."""
    known = [k for k in _SETTINGS if k not in CLI_ONLY and k not in ("thresholds", "config_file")]
    match = difflib.get_close_matches(key, [*known, *_THRESHOLDS], n=1)
    return f" (did you mean {match[0].replace('_', '-')!r}?)" if match else ""


def _validate(s: CheckSettings, sources: dict[str, str]) -> None:
    def where(key: str) -> str:
        return sources.get(key, DEFAULT)

    if not (s.baseline_margin >= 0 and s.baseline_margin != float("inf")):
        raise ConfigError(
            f"baseline-margin = {s.baseline_margin} ({where('baseline_margin')}): expected a "
            "fraction >= 0, e.g. 0.1 for 10 %"
        )
    for key in ("steps_per_epoch", "accumulate"):
        value = getattr(s, key)
        if value is not None and value < 1:
            raise ConfigError(
                f"{key.replace('_', '-')} = {value} ({where(key)}): expected a whole number >= 1"
            )
    if s.max_annotations < 0:
        raise ConfigError(
            f"max-annotations = {s.max_annotations} ({where('max_annotations')}): expected >= 0"
        )


def _from_file(key: str, raw: Any, raw_key: str, path: Path) -> Any:
    if key in _ENUMS:
        try:
            return _ENUMS[key](raw)
        except ValueError:
            choices = ", ".join(e.value for e in _ENUMS[key])
            raise ConfigError(f"{path}: {raw_key} = {raw!r}: choose one of {choices}") from None
    if key in _PATHS:
        return path.parent / _coerce(raw, "str", raw_key, path)
    if key == "ignore":
        return parse_ignores(raw, str(path))
    if key == "model_args":
        if not (isinstance(raw, list) and all(isinstance(v, str) for v in raw)):
            raise ConfigError(
                f"{path}: {raw_key} = {raw!r}: expected a list of NAME=VALUE strings, "
                'e.g. ["num_classes=10"]'
            )
        return tuple(raw)
    if key in ("mean", "std") and isinstance(raw, list):  # mean = [0.5, 0.5, 0.5]
        return ",".join(str(v) for v in raw)
    if key == "data" and isinstance(raw, str) and (path.parent / raw).exists():
        return str(path.parent / raw)
    if key in ("model", "metric", "data") and isinstance(raw, str):
        head, sep, name = raw.rpartition(":")
        if sep and head.endswith(".py"):
            return f"{path.parent / head}:{name}"
    if key == "input" and isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    return _coerce(raw, _KINDS.get(key, "str"), raw_key, path)


def _coerce(raw: Any, kind: Any, raw_key: str, path: Path) -> Any:
    kind = getattr(kind, "__name__", kind)
    ok = {
        "int": isinstance(raw, int) and not isinstance(raw, bool),
        "float": isinstance(raw, (int, float)) and not isinstance(raw, bool),
        "str": isinstance(raw, str),
        "bool": isinstance(raw, bool),
    }.get(str(kind), False)
    if not ok:
        raise ConfigError(f"{path}: {raw_key} = {raw!r}: expected {kind}")
    return float(raw) if kind == "float" else raw


def render_settings(
    settings: CheckSettings, sources: dict[str, str], *, unset: frozenset[str] = frozenset()
) -> str:
    """The effective settings as a [tool.bnaudit] table, each with where it came from.

    Keys in `unset` are shown as not set whatever their value.
    """
    file = settings.config_file
    lines = [
        "# effective bnaudit settings: defaults < "
        + (f"{file}" if file else "no config file")
        + " < command line",
        "[tool.bnaudit]",
    ]
    flat: dict[str, Any] = {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name not in ("thresholds", "config_file", "ignore")
    }
    flat.update(dataclasses.asdict(settings.thresholds))
    rows = []
    for key, value in flat.items():
        origin = sources.get(key, DEFAULT)
        if key in unset:
            value, origin = None, "not given"
        if key in CLI_ONLY:
            origin += ", command line only"
        name = key.replace("_", "-")
        text = f"# {name} is not set" if value is None else f"{name} = {_toml(value)}"
        rows.append((text, origin))
    width = max(len(text) for text, _ in rows)
    lines += [f"{text:<{width}}  # {origin}" for text, origin in rows]
    if settings.ignore:
        lines.append(f"ignore = [  # {sources.get('ignore', DEFAULT)}")
        for entry in settings.ignore:
            fields = ", ".join(
                f"{k} = {_toml(getattr(entry, k))}" for k in ("layer", "code", "reason")
            )
            lines.append(f"  {{{fields}}},")
        lines.append("]")
    else:
        lines.append(f"ignore = []  # {sources.get('ignore', DEFAULT)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    # A JSON string is a valid TOML basic string (both escape quotes, backslashes, controls).
    return json.dumps(str(value), ensure_ascii=False)


HASH_OFF = "not computed: --no-hash (or hash = false in the configuration)"
HASH_QUICK_LOOK = "not computed: a static audit shown as a table only; --hash computes it"


def hash_skipped(s: CheckSettings, environ: Mapping[str, str]) -> str | None:
    """Why `bnaudit check` with these settings leaves the SHA-256 out ("not computed: …"),
    None when it computes it.

    `s.hash` None (the default) hashes whatever is kept or gated on: a report file, a baseline,
    stdout in a machine-readable format, a run under GitHub Actions, and every audit with
    --model (its passes take longer than the hash, which runs beside them). What is left is a
    look at the table of a static audit, where the hash would cost more than the audit.
    """
    if s.hash is not None:
        return None if s.hash else HASH_OFF
    kept = (s.markdown, s.csv, s.json, s.html, s.junit, s.write_baseline)
    if (
        s.model is not None
        or any(path is not None for path in kept)
        or s.format is not Format.TABLE
        or s.github.enabled(environ)
    ):
        return None
    return HASH_QUICK_LOOK
