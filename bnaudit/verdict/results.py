"""Typed audit results: what was measured per layer, what was found, and whether it passed."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

MODEL = "<model>"  # the layer name of findings about the whole model


def counted(n: int, one: str, many: str | None = None) -> str:
    """'1 batch', '3 batches': a count with its noun in the right number."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


class Severity(enum.IntEnum):
    OK = 0
    INFO = 1
    WARN = 2
    FAIL = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class FailOn(str, enum.Enum):
    """The lowest severity that makes the gate fail (exit 1)."""

    FAIL = "fail"
    WARN = "warn"
    NEVER = "never"

    def fails(self, severity: Severity) -> bool:
        if self is FailOn.NEVER:
            return False
        return severity >= (Severity.WARN if self is FailOn.WARN else Severity.FAIL)


class Status(str, enum.Enum):
    """Whether a finding counts for the gate, and why (see bnaudit.gate.ignores,
    bnaudit.gate.baseline)."""

    OPEN = "open"  # counts: no baseline judged it
    NEW = "new"  # counts: not in the baseline
    WORSE = "worse"  # counts: in the baseline, but worse beyond the margin
    BASELINED = "baselined"  # does not count: in the baseline and not worse
    IGNORED = "ignored"  # does not count: an ignore entry of the configuration matches it

    @property
    def waived(self) -> bool:
        return self in (Status.BASELINED, Status.IGNORED)


@dataclass(frozen=True)
class Finding:
    """One problem on one layer: a stable code, the numbers behind it and how to fix it.

    A waived finding (ignored or baselined) is still reported, with `status_reason` saying why,
    but it does not count for the layer's verdict nor for the gate.
    """

    layer: str
    code: str
    severity: Severity
    message: str  # says the measured value and the threshold
    hint: str = ""
    value: float | None = None
    threshold: float | None = None
    status: Status = Status.OPEN
    status_reason: str = ""  # the ignore reason, or the baseline comparison

    @property
    def counts(self) -> bool:
        """Whether the finding counts for the verdicts and the gate."""
        return not self.status.waived


@dataclass(frozen=True)
class Attributes:
    """What the layer is, read off its attributes and buffers."""

    kind: str  # batch, instance or frozen (see bnaudit.core.layers.LayerKind)
    channels: int
    eps: float
    momentum: float | None  # None: cumulative average; NaN: unknown (a bare state dict)
    affine: bool
    track_running_stats: bool
    num_batches_tracked: int | None
    dtype: str
    buffer_dtype: str  # of the running stats, "" without them
    # why num_batches_tracked is not a count (then num_batches_tracked is None); "" when it is
    counter_problem: str = ""


@dataclass(frozen=True)
class Stored:
    """The static checks of the stored buffers: what holds without any data."""

    nonfinite_values: int
    negative_var_channels: int
    zero_var_channels: int
    initial_stats: bool  # μ_r exactly 0 and σ²_r exactly 1 everywhere: never updated
    max_amplification: float  # max |γ|/sqrt(σ²_r + ε)


@dataclass(frozen=True)
class Seen:
    """What the passes saw of the layer."""

    calls: int
    values_per_channel: int  # N, fewest in one batch
    batch_size: int  # smallest leading dim seen
    nonfinite_inputs: int  # non-finite values arriving from upstream
    nonfinite_outputs: int  # non-finite outputs this layer made from finite inputs
    # where the output was read: "" the layer's own; "input of drop": a BatchNormAct's
    # normalisation, before its dropout and activation (bnaudit.core.layers.act_tap)
    measured_at: str = ""


@dataclass(frozen=True)
class Reconstruction:
    """The layer's output in one mode against the BN formula."""

    max_err: float
    ratio: float  # worst |y − ref| / (atol + rtol·scale)
    # the best explanation of a mismatch (bnaudit.measure.explain), "" when the output matched
    explanation: str
    explanation_key: str
    explanation_err: float
    explanation_ratio: float


@dataclass(frozen=True)
class Drifted:
    """How far the running stats are from one regime's input, and whether that was judged."""

    shift_max: float  # |μ − μ_r| / sqrt(σ²_r + ε), worst channel
    log_var_max: float  # ln((σ² + ε)/(σ²_r + ε)), largest in magnitude, signed
    fraction: float  # channels beyond the thresholds and beyond noise
    p: float  # chance that noise alone puts that many channels off (bnaudit.verdict.significance)
    channel: int  # worst channel, -1 when none
    judged: str  # "yes", or why the verdict was not drawn
    # the medians are reported for the train-mode regime only
    shift_median: float = math.nan
    log_var_median: float = math.nan


@dataclass(frozen=True)
class Regime:
    """One mode's figures: its output against the formula, its input against the running stats.

    Train mode: the drift is staleness (the running stats against train-mode batches).
    Eval mode: the drift is the train/eval gap.
    """

    recon: Reconstruction
    drift: Drifted


@dataclass(frozen=True)
class Update:
    """The running-stats update: the check of one update, momentum and variance-bias figures."""

    mean_ratio: float
    var_ratio: float
    count_errors: int
    # biased vs unbiased variance
    bessel_factor: float  # N/(N−1)
    var_ratio_observed: float  # σ²_r / mean biased batch variance, median channel
    eval_scale: float  # sqrt((N−1)/N): eval output scale relative to train mode
    # momentum
    init_weight: float  # (1 − m)^T
    ema_window: float  # (2 − m)/m batches
    ema_jitter: float  # expected EMA sd of the running mean, in σ_r units, median channel
    step_shift: float  # how far one more train step moves μ_r, in σ_r units, worst
    step_log_var: float  # |ln(σ²_r,new/σ²_r)| for one more train step, worst


@dataclass(frozen=True)
class Folding:
    """conv/linear → BN folding (bnaudit.measure.fold)."""

    into: str = ""  # the conv or linear this BN folds into; "" when none
    checked: bool = False  # the fold was run on the first batch
    max_err: float = math.nan
    ratio: float = math.nan
    weight_max: float = math.nan  # max |W'| and |b'|
    int8_levels: float = math.nan  # median output channel, int8 per-tensor


@dataclass(frozen=True)
class Placement:
    """Where a BN layer of the checkpoint is in a deployed artifact (`bnaudit.artifact`)."""

    place: str = ""  # kept, folded, folded-stale, ... (PLACES); "" when no artifact was checked
    node: str = ""  # the artifact's BatchNormalization node, or the Conv/Gemm it was folded into
    param_ratio: float = math.nan  # worst parameter difference / the artifact dtype's tolerance
    output_err: float = math.nan  # the layer's output in the artifact against the model's, max
    # |difference| relative to max |model output|, over the batches


def _named(path: str, names: str, prefix: str = "") -> tuple[tuple[str, str, str], ...]:
    return tuple((prefix + n, path, n) for n in names.split())


# The flat names of the reports (CSV columns, JSON `metrics` keys, to_frame columns, the logged
# numbers), in report order: (flat name, group path in LayerMetrics, field of that group).
FLAT: tuple[tuple[str, str, str], ...] = (
    *_named(
        "attrs",
        "kind channels eps momentum affine track_running_stats num_batches_tracked dtype"
        " buffer_dtype",
    ),
    *_named(
        "stored",
        "nonfinite_values negative_var_channels zero_var_channels initial_stats max_amplification",
    ),
    *_named("seen", "calls values_per_channel batch_size nonfinite_inputs nonfinite_outputs"),
    *_named("train.recon", "max_err ratio", "recon_train_"),
    *_named("eval.recon", "max_err ratio", "recon_eval_"),
    *_named(
        "train.recon",
        "explanation explanation_key explanation_err explanation_ratio",
        "recon_train_",
    ),
    *_named(
        "eval.recon", "explanation explanation_key explanation_err explanation_ratio", "recon_eval_"
    ),
    *_named("update", "mean_ratio var_ratio count_errors", "update_"),
    *_named(
        "train.drift",
        "shift_max shift_median log_var_max log_var_median fraction p channel judged",
        "stale_",
    ),
    *_named("eval.drift", "shift_max log_var_max fraction p channel judged", "gap_"),
    *_named(
        "update",
        "bessel_factor var_ratio_observed eval_scale init_weight ema_window ema_jitter"
        " step_shift step_log_var",
    ),
    ("output_change_alone", "", "output_change_alone"),
    ("fold_with", "fold", "into"),
    *_named("fold", "checked max_err ratio", "fold_"),
    ("folded_weight_max", "fold", "weight_max"),
    ("fold_int8_levels", "fold", "int8_levels"),
    ("counter_problem", "attrs", "counter_problem"),
    ("measured_at", "seen", "measured_at"),
    *_named("artifact", "place node param_ratio output_err", "artifact_"),
)
_GROUPS: dict[str, type] = {
    "attrs": Attributes,
    "stored": Stored,
    "seen": Seen,
    "train.recon": Reconstruction,
    "train.drift": Drifted,
    "eval.recon": Reconstruction,
    "eval.drift": Drifted,
    "update": Update,
    "fold": Folding,
    "artifact": Placement,
}


@dataclass(frozen=True)
class LayerMetrics:
    """Every number measured on one layer, grouped by what it describes. NaN means not
    measured (see the report notes). `flat()` gives them under the reports' flat names."""

    attrs: Attributes
    stored: Stored
    seen: Seen
    train: Regime  # train mode: reconstruction and staleness
    eval: Regime  # eval mode: reconstruction and the train/eval gap
    update: Update
    fold: Folding = Folding()
    artifact: Placement = Placement()  # only in an artifact check (check ARTIFACT --against)
    # output impact (--attribution): rel L2 change of the output with only this layer recalibrated
    output_change_alone: float = math.nan

    def flat(self) -> dict[str, Any]:
        """Every metric under its flat report name (`FLAT`), in report order."""
        return {name: getattr(self._group(path), field) for name, path, field in FLAT}

    def _group(self, path: str) -> Any:
        group: Any = self
        for part in path.split(".") if path else ():
            group = getattr(group, part)
        return group

    @classmethod
    def from_flat(cls, **values: Any) -> LayerMetrics:
        """The metrics from their flat report names (`FLAT`), the inverse of `flat()`."""
        unknown = sorted(set(values) - {name for name, _, _ in FLAT})
        if unknown:
            raise TypeError(f"LayerMetrics has no metric named {', '.join(unknown)}")
        parts: dict[str, dict[str, Any]] = {path: {} for path in [*_GROUPS, ""]}
        for name, path, field in FLAT:
            if name in values:
                parts[path][field] = values[name]
        made = {path: group(**parts[path]) for path, group in _GROUPS.items()}
        return cls(
            attrs=made["attrs"],
            stored=made["stored"],
            seen=made["seen"],
            train=Regime(made["train.recon"], made["train.drift"]),
            eval=Regime(made["eval.recon"], made["eval.drift"]),
            update=made["update"],
            fold=made["fold"],
            artifact=made["artifact"],
            **parts[""],
        )

    @classmethod
    def unmeasured(cls, why: str, **known: Any) -> LayerMetrics:
        """Metrics of a layer that could not be audited (`why`): nothing measured but `known`,
        given by flat name.

        Numbers are NaN (not measured), counts 0, texts empty; momentum is unknown (NaN, as
        None would mean a cumulative average) and no channel is the worst.
        """
        blank = {"float": math.nan, "int": 0, "str": "", "bool": False}
        values: dict[str, Any] = {}
        for name, path, field in FLAT:
            f = next(f for f in dataclasses.fields(_GROUPS.get(path, cls)) if f.name == field)
            if f.default is dataclasses.MISSING:
                values[name] = blank.get(str(f.type))
        values |= {"momentum": math.nan, "stale_channel": -1, "gap_channel": -1}
        values |= {"stale_judged": f"no: {why}", "gap_judged": f"no: {why}"}
        return cls.from_flat(**(values | known))


class Judged:
    """A layer's verdict from its findings (`LayerResult`, `diff_results.LayerDiff`)."""

    findings: tuple[Finding, ...]

    @property
    def severity(self) -> Severity:
        """The worst severity among the findings that count (waived ones do not)."""
        return max((f.severity for f in self.findings if f.counts), default=Severity.OK)

    @property
    def verdict(self) -> str:
        return self.severity.label

    @property
    def waived(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.counts)


@dataclass(frozen=True)
class LayerResult(Judged):
    name: str
    type: str
    metrics: LayerMetrics
    findings: tuple[Finding, ...] = ()


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/Inf: non-finite numbers become null."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value
