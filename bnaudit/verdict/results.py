"""Typed audit results: what was measured per layer, what was found, and whether it passed."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

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
class LayerMetrics:
    """Every number measured on one layer. NaN means not measured (see the report notes)."""

    # attributes
    kind: str  # batch, instance or frozen (see bnaudit.core.layers.Kind)
    channels: int
    eps: float
    momentum: float | None  # None: cumulative average; NaN: unknown (a bare state dict)
    affine: bool
    track_running_stats: bool
    num_batches_tracked: int | None
    dtype: str
    buffer_dtype: str  # of the running stats, "" without them
    # static checks
    nonfinite_values: int
    negative_var_channels: int
    zero_var_channels: int
    initial_stats: bool  # μ_r exactly 0 and σ²_r exactly 1 everywhere: never updated
    max_amplification: float  # max |γ|/sqrt(σ²_r + ε)
    # what the passes saw
    calls: int
    values_per_channel: int  # N, fewest in one batch
    batch_size: int  # smallest leading dim seen
    nonfinite_inputs: int  # non-finite values arriving from upstream
    nonfinite_outputs: int  # non-finite outputs this layer made from finite inputs
    # 1. reconstruction
    recon_train_max_err: float
    recon_train_ratio: float  # worst |y − ref| / (atol + rtol·scale)
    recon_eval_max_err: float
    recon_eval_ratio: float
    # the best explanation of a mismatch (bnaudit.measure.explain), "" when the output matched
    recon_train_explanation: str
    recon_train_explanation_key: str
    recon_train_explanation_err: float
    recon_train_explanation_ratio: float
    recon_eval_explanation: str
    recon_eval_explanation_key: str
    recon_eval_explanation_err: float
    recon_eval_explanation_ratio: float
    update_mean_ratio: float
    update_var_ratio: float
    update_count_errors: int
    # 2. stale running stats (train-mode regime)
    stale_shift_max: float  # |μ − μ_r| / sqrt(σ²_r + ε), worst channel
    stale_shift_median: float
    stale_log_var_max: float  # ln((σ² + ε)/(σ²_r + ε)), largest in magnitude, signed
    stale_log_var_median: float
    stale_fraction: float  # channels beyond the thresholds and beyond noise
    stale_p: (
        float  # chance that noise alone puts that many channels off (bnaudit.verdict.significance)
    )
    stale_channel: int  # worst channel, -1 when none
    stale_judged: str  # "yes", or why the verdict was not drawn
    # 3. train/eval gap (eval-mode regime)
    gap_shift_max: float
    gap_log_var_max: float
    gap_fraction: float
    gap_p: float
    gap_channel: int
    gap_judged: str
    # 4. biased vs unbiased variance
    bessel_factor: float  # N/(N−1)
    var_ratio_observed: float  # σ²_r / mean biased batch variance, median channel
    eval_scale: float  # sqrt((N−1)/N): eval output scale relative to train mode
    # 5. momentum
    init_weight: float  # (1 − m)^T
    ema_window: float  # (2 − m)/m batches
    ema_jitter: float  # expected EMA sd of the running mean, in σ_r units, median channel
    step_shift: float  # how far one more train step moves μ_r, in σ_r units, worst
    step_log_var: float  # |ln(σ²_r,new/σ²_r)| for one more train step, worst
    # output impact (--attribution): rel L2 change of the output with only this layer recalibrated
    output_change_alone: float = math.nan
    # conv/linear → BN folding (bnaudit.measure.fold)
    fold_with: str = ""  # the conv or linear this BN folds into; "" when none
    fold_checked: bool = False  # the fold was run on the first batch
    fold_max_err: float = math.nan
    fold_ratio: float = math.nan
    folded_weight_max: float = math.nan  # max |W'| and |b'|
    fold_int8_levels: float = math.nan  # median output channel, int8 per-tensor
    # why num_batches_tracked is not a count (then num_batches_tracked is None); "" when it is
    counter_problem: str = ""
    # where the output was read: "" the layer's own; "input of drop": a BatchNormAct's
    # normalisation, before its dropout and activation (bnaudit.core.layers.act_tap)
    measured_at: str = ""

    @classmethod
    def unmeasured(cls, why: str, **known: object) -> LayerMetrics:
        """Metrics of a layer that could not be audited (`why`): nothing measured but `known`.

        Numbers are NaN (not measured), counts 0, texts empty; momentum is unknown (NaN, as
        None would mean a cumulative average) and no channel is the worst.
        """
        blank = {"float": math.nan, "int": 0, "str": "", "bool": False}
        values: dict[str, object] = {
            f.name: blank.get(str(f.type))
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
        }
        values |= {"momentum": math.nan, "stale_channel": -1, "gap_channel": -1}
        values |= {"stale_judged": f"no: {why}", "gap_judged": f"no: {why}"}
        return cls(**(values | known))  # type: ignore[arg-type]


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
