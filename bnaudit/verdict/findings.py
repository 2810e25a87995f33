"""Thresholds, and the rules that turn a layer's metrics into findings.

Every rule handles non-finite numbers explicitly: NaN compares false, so `value > limit` alone
would let a NaN through.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from bnaudit.core.keys import ACTIVATION_KEY
from bnaudit.verdict.codes import HINTS, SITUATION_HINTS, hint
from bnaudit.verdict.results import MODEL, Finding, LayerMetrics, Severity
from bnaudit.verdict.significance import CountRule

# Shared with fold.py and explain.py; kept here so that judging needs no torch.
FLOAT16_MAX = 65504.0
MIN_INT8_LEVELS = 8.0  # int8 levels a folded channel keeps, below which the fold is at risk

JUDGED = "yes"
_FORMULA_CODES = frozenset({"recon-train", "recon-eval", "running-update"})

# Half-precision buffer dtypes → (relative rounding step 2^-mantissa bits, what else goes wrong).
_HALF = {
    "float16": (2.0**-11, "; values above 65504 overflow to inf"),
    "bfloat16": (2.0**-8, ""),
}


@dataclass(frozen=True)
class Thresholds:
    """Limits of the audit; defaults are documented in the README (Findings)."""

    max_error_ratio: float = 1.0  # reconstruction error / tolerance
    stale_shift: float = 0.3  # |μ − μ_r| / sqrt(σ²_r + ε)
    stale_log_var: float = 0.4  # |ln((σ² + ε)/(σ²_r + ε))|: variance off by 1.49× or more
    stale_z: float = 4.0  # and beyond this many sds of sample noise plus EMA jitter
    stale_fraction: float = 0.1  # of the channels (and at least 2), for a layer verdict
    stale_alpha: float = 1e-3  # and a count of off channels noise alone reaches less often
    min_batch: int = 3  # smaller audit batches make the stale comparison unreliable
    var_bias_scale: float = 0.02  # eval/train output scale 1 − sqrt((N−1)/N) above this warns
    max_amplification: float = 1000.0  # |γ|/sqrt(σ²_r + ε)
    max_init_weight: float = 0.05  # (1 − m)^T still carried by the initial values
    keras_momentum: float = 0.5  # m at or above this is likely a Keras/TF value
    max_output_change: float = math.inf  # rel L2 output change from recalibration (off)

    def replace(self, **changes: float) -> Thresholds:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown threshold(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.3g}"


def count_rule(t: Thresholds) -> CountRule:
    return CountRule(t.stale_fraction, t.stale_alpha)


def off_channels(fraction: float, channels: int) -> int:
    """How many channels a fraction of `channels` is (0 when unmeasured)."""
    return round(fraction * channels) if math.isfinite(fraction) else 0


def is_stale(m: LayerMetrics, t: Thresholds) -> bool:
    """Enough channels off, beyond what noise from these batches explains."""
    off = off_channels(m.stale_fraction, m.channels)
    return m.stale_judged == JUDGED and count_rule(t).holds(off, m.channels, m.stale_p)


def has_gap(m: LayerMetrics, t: Thresholds) -> bool:
    """The same rule for the eval-mode input."""
    off = off_channels(m.gap_fraction, m.channels)
    return m.gap_judged == JUDGED and count_rule(t).holds(off, m.channels, m.gap_p)


UPSTREAM_SHOWN = 3  # stale layers named in a downstream finding; deep models have dozens


def _few(names: tuple[str, ...], shown: int = UPSTREAM_SHOWN) -> str:
    """`a, b, c` or, past `shown`, `a, b, c and 5 more` (the first to run come first)."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def judge_layer(
    name: str,
    m: LayerMetrics,
    t: Thresholds,
    *,
    type_name: str,
    overrides_forward: bool,
    batches: int,
    upstream_stale: tuple[str, ...] = (),
    runs_first: bool = False,
) -> tuple[Finding, ...]:
    """All findings for one layer, most severe first.

    `batches` is how many batches were run (0: static checks only); `upstream_stale` names the
    stale layers that ran before this one, whose eval-mode effect reaches it; `runs_first`: no
    BN layer that fits the data runs before this one (only stale ones, or none).
    """
    out: list[Finding] = []

    def add(
        code: str,
        sev: Severity,
        msg: str,
        value=None,
        threshold=None,
        situation: str = "",
        **fields: str,
    ) -> None:
        out.append(Finding(name, code, sev, msg, hint(code, situation, **fields), value, threshold))

    # 6. static checks
    if m.nonfinite_values:
        add(
            "nonfinite",
            Severity.FAIL,
            f"{m.nonfinite_values} NaN/Inf value(s) in weight, bias or running stats",
            m.nonfinite_values,
            0,
            "values",
        )
    if m.nonfinite_outputs and not m.nonfinite_values:
        add(
            "nonfinite",
            Severity.FAIL,
            f"{m.nonfinite_outputs} non-finite output value(s) on the sample batches",
            m.nonfinite_outputs,
            0,
            "outputs",
        )
    if m.negative_var_channels:
        add(
            "bad-var",
            Severity.FAIL,
            f"running_var < 0 in {m.negative_var_channels} channel(s)",
            m.negative_var_channels,
            0,
            "negative",
        )
    if m.zero_var_channels:
        add(
            "bad-var",
            Severity.WARN,
            f"running_var exactly 0 in {m.zero_var_channels} "
            "channel(s): eval mode divides by sqrt(eps) there",
            m.zero_var_channels,
            0,
            "zero",
        )
    if math.isfinite(m.max_amplification) and m.max_amplification > t.max_amplification:
        add(
            "tiny-var",
            Severity.WARN,
            f"max |gamma|/sqrt(running_var + eps) = "
            f"{_fmt(m.max_amplification)} > {_fmt(t.max_amplification)}",
            m.max_amplification,
            t.max_amplification,
        )
    if m.buffer_dtype in _HALF:
        add(
            "half-buffers",
            Severity.WARN,
            f"running stats stored in {m.buffer_dtype}: relative precision "
            f"{_HALF[m.buffer_dtype][0]:.1g}, so an update m*(batch - running) smaller than that "
            f"is rounded away and the statistics stall{_HALF[m.buffer_dtype][1]}",
        )
    if m.counter_problem:
        add(
            "bad-counter",
            Severity.WARN,
            f"num_batches_tracked is not a count of batches: {m.counter_problem}",
        )
    elif m.track_running_stats and m.num_batches_tracked is None and m.kind != "instance":
        add(
            "no-counter",
            Severity.INFO,
            "no num_batches_tracked: a FrozenBatchNorm-style layer, or saved by torch < 0.4.1",
        )
    if not m.track_running_stats:
        add(
            "no-running-stats",
            Severity.WARN,
            "track_running_stats=False: eval mode normalises with batch statistics",
        )
    _judge_init(add, m, t)

    # 1. reconstruction
    if batches and m.calls == 0:
        add(
            "not-reached",
            Severity.INFO,
            "no forward call reached this layer; only the static checks ran",
        )
    variant = ""  # what a forward-overriding subclass adds after a correct normalisation
    for code, mode, ratio, err, why in (
        (
            "recon-train",
            "train",
            m.recon_train_ratio,
            m.recon_train_max_err,
            _why(
                m.recon_train_explanation,
                m.recon_train_explanation_key,
                m.recon_train_explanation_err,
                m.recon_train_explanation_ratio,
            ),
        ),
        (
            "recon-eval",
            "eval",
            m.recon_eval_ratio,
            m.recon_eval_max_err,
            _why(
                m.recon_eval_explanation,
                m.recon_eval_explanation_key,
                m.recon_eval_explanation_err,
                m.recon_eval_explanation_ratio,
            ),
        ),
    ):
        if not (m.calls and _over(ratio, t.max_error_ratio)):
            continue
        fits = why is not None and why[2] <= t.max_error_ratio
        if fits and overrides_forward and why[3].startswith(ACTIVATION_KEY):
            variant = f"{why[0]} (err {_fmt(why[1])}); the normalisation itself is exact"
            continue
        if fits:
            reason = f"; it matches {why[0]} (err {_fmt(why[1])}) instead"
            situation = _explained(code, why[3])
        elif why is not None:
            reason = f"; no known mistake explains it (closest: {why[0]}, err {_fmt(why[1])})"
            situation = "unexplained"
        else:
            reason, situation = "", "undiagnosed"
        add(
            code,
            Severity.FAIL,
            f"{mode}-mode output differs from the BN formula: max abs err {_fmt(err)}, "
            f"{_fmt(ratio)}x the tolerance (limit {_fmt(t.max_error_ratio)}x){reason}",
            ratio,
            t.max_error_ratio,
            situation,
            layer=name,
        )
    frozen = m.kind == "frozen"  # never updated, never normalised with batch statistics
    if m.calls and m.track_running_stats and not frozen:
        pair = (m.update_mean_ratio, m.update_var_ratio)
        worst = math.nan if any(map(math.isnan, pair)) else max(pair)  # max() may drop a NaN
        if _over(worst, t.max_error_ratio):
            add(
                "running-update",
                Severity.FAIL,
                "one train step moves the running stats away "
                f"from (1-m)*old + m*batch: {_fmt(m.update_mean_ratio)}x (mean), "
                f"{_fmt(m.update_var_ratio)}x (var) the tolerance",
                worst,
                t.max_error_ratio,
                "stats",
            )
        if m.update_count_errors:
            add(
                "running-update",
                Severity.FAIL,
                f"num_batches_tracked did not grow by 1 in {m.update_count_errors} train step(s)",
                m.update_count_errors,
                0,
                "counter",
            )
    if overrides_forward:
        mismatch = any(f.code in _FORMULA_CODES for f in out)
        if mismatch:
            sev, what, situation = Severity.WARN, "and does not compute plain BN", "mismatch"
        elif variant:
            sev, what, situation = Severity.INFO, f"and its output is {variant}", "variant"
        elif m.measured_at and m.calls:
            what = f"and computes plain BN before what it adds (measured at the {m.measured_at})"
            sev, situation = Severity.INFO, "inside"
        elif not m.calls:  # nothing ran: there is no output to speak of
            sev, what, situation = Severity.INFO, "(not run, so not checked)", "unchecked"
        else:
            sev, what, situation = Severity.INFO, "and still computes plain BN", "plain"
        add(
            "nonstandard-forward",
            sev,
            f"{type_name} overrides forward {what}",
            None,
            None,
            situation,
        )

    # 2./3. stale statistics and the train/eval gap
    if is_stale(m, t):
        add(
            "stale-stats",
            Severity.FAIL,
            "running stats do not describe the train-mode input, relative to these batches: "
            f"{_count(m.stale_fraction, m.channels, m.stale_p, t)}: mean shift up to "
            f"{_fmt(m.stale_shift_max)} sd (limit {_fmt(t.stale_shift)}), ln var ratio up to "
            f"{_fmt(m.stale_log_var_max)} (limit +/-{_fmt(t.stale_log_var)}); worst channel "
            f"{m.stale_channel}"
            + ("; no BN layer that fits these batches runs before it" if runs_first else ""),
            m.stale_fraction,
            t.stale_fraction,
            "first" if runs_first else "stale",
        )
    elif has_gap(m, t):
        msg = (
            "eval-mode input drifts from the running stats: "
            f"{_count(m.gap_fraction, m.channels, m.gap_p, t)}: mean shift "
            f"{_fmt(m.gap_shift_max)} sd, ln var ratio {_fmt(m.gap_log_var_max)}; the stats "
            "fit train mode"
        )
        if upstream_stale:
            add(
                "train-eval-gap",
                Severity.INFO,
                msg + "; likely a consequence of stale stats "
                f"earlier in the forward pass ({_few(upstream_stale)})",
                m.gap_fraction,
                t.stale_fraction,
                "downstream",
                upstream=_few(upstream_stale),
            )
        else:
            add("train-eval-gap", Severity.WARN, msg, m.gap_fraction, t.stale_fraction, "gap")

    # 4. biased vs unbiased variance
    mismatch_scale = 1.0 - m.eval_scale
    if m.calls and not frozen and _over(mismatch_scale, t.var_bias_scale):
        add(
            "var-bias",
            Severity.WARN,
            f"N = {m.values_per_channel} values per channel: "
            f"running_var estimates the unbiased variance, {_fmt(m.bessel_factor)}x the biased "
            f"one train mode uses (observed {_fmt(m.var_ratio_observed)}x); eval outputs are "
            f"scaled by {_fmt(m.eval_scale)} relative to train mode (limit "
            f"{_fmt(1 - t.var_bias_scale)})",
            mismatch_scale,
            t.var_bias_scale,
        )

    # folding into the conv/linear before
    if m.fold_with and m.fold_checked and _over(m.fold_ratio, t.max_error_ratio):
        add(
            "fold-mismatch",
            Severity.FAIL,
            f"folded into {m.fold_with}, the output differs from {m.fold_with} -> BN: max abs err "
            f"{_fmt(m.fold_max_err)}, {_fmt(m.fold_ratio)}x the tolerance (limit "
            f"{_fmt(t.max_error_ratio)}x)",
            m.fold_ratio,
            t.max_error_ratio,
        )
    if m.fold_with and m.folded_weight_max > FLOAT16_MAX:
        add(
            "fold-risk",
            Severity.WARN,
            f"folded into {m.fold_with}, max |weight| or |bias| is {_fmt(m.folded_weight_max)}: "
            f"overflows float16 (max {FLOAT16_MAX:g}); fold scale up to "
            f"{_fmt(m.max_amplification)}",
            m.folded_weight_max,
            FLOAT16_MAX,
            "float16",
        )
    elif m.fold_with and m.fold_int8_levels < MIN_INT8_LEVELS:
        add(
            "fold-risk",
            Severity.WARN,
            f"folded into {m.fold_with}, the median output channel keeps "
            f"{_fmt(m.fold_int8_levels)} of 127 int8 per-tensor levels (limit "
            f"{MIN_INT8_LEVELS:g}); fold scale up to {_fmt(m.max_amplification)}",
            m.fold_int8_levels,
            MIN_INT8_LEVELS,
            "int8",
        )

    # 5. momentum
    if m.momentum is not None and m.momentum >= t.keras_momentum:
        add(
            "momentum-convention",
            Severity.WARN,
            f"momentum = {_fmt(m.momentum)} >= "
            f"{_fmt(t.keras_momentum)}: likely a Keras/TF value; the running stats are "
            "essentially the last batch",
            m.momentum,
            t.keras_momentum,
        )
    return tuple(sorted(out, key=lambda f: -f.severity))


def not_audited(name: str, why: str) -> Finding:
    """A key group with running stats that cannot be audited as BatchNorm: a finding, not a
    silent skip, since a layer left out is a layer the gate cannot vouch for."""
    return Finding(
        name,
        "not-audited",
        Severity.FAIL,
        f"running stats, but not BatchNorm-shaped ({why}): the layer was not audited",
        HINTS["not-audited"],
    )


def _judge_init(add, m: LayerMetrics, t: Thresholds) -> None:
    if not m.track_running_stats:
        return
    if m.num_batches_tracked == 0 and not m.initial_stats:
        add(
            "init-stats",
            Severity.INFO,
            "num_batches_tracked = 0 but the running stats are not "
            "the initial values: saved before the counter existed, or the counter was reset",
            situation="no-count",
        )
    elif m.initial_stats and m.kind == "frozen":
        add(
            "init-stats",
            Severity.FAIL,
            "running stats are exactly the initial values (mean 0, var 1) of a frozen layer, "
            "which never updates them: they were never loaded",
            situation="frozen",
        )
    elif m.initial_stats and (m.num_batches_tracked or 0) > 0:
        add(
            "init-stats",
            Severity.FAIL,
            "running stats are exactly the initial values (mean 0, var 1) although "
            f"num_batches_tracked = {m.num_batches_tracked}: reset or overwritten after the "
            "updates it counts",
            situation="reset",
        )
    elif m.initial_stats:
        add(
            "init-stats",
            Severity.FAIL,
            "running stats are exactly the initial values "
            f"(mean 0, var 1; num_batches_tracked = {m.num_batches_tracked}): never updated",
            situation="never-updated",
        )
    elif (
        (m.num_batches_tracked or 0) >= 1
        and _momentum_known(m)  # NaN init_weight from an unknown momentum is not a finding
        and _over(m.init_weight, t.max_init_weight)
    ):
        # A few updates may also be a cumulative average over few batches (update_bn leaves
        # T = batches): when the data confirms the stats, the residue is only a possibility.
        if m.stale_judged != JUDGED:
            sev, situation, why = Severity.WARN, "unverified", ""
        elif is_stale(m, t):
            sev, situation, why = Severity.WARN, "stale", "; the stats do not fit the data either"
        else:
            sev, situation = Severity.INFO, "verified"
            why = "; the stats fit the data, so they were likely averaged otherwise"
        add(
            "momentum-warmup",
            sev,
            f"after T = {m.num_batches_tracked} updates an EMA would still carry "
            f"(1-m)^T = {_fmt(m.init_weight)} of the initial values (limit "
            f"{_fmt(t.max_init_weight)}){why}",
            m.init_weight,
            t.max_init_weight,
            situation,
        )


def _why(label: str, key: str, err: float, ratio: float) -> tuple[str, float, float, str] | None:
    """(explanation, its max abs err, its err ratio, its key) or None."""
    if not label:
        return None
    return label, err, ratio, key


def _explained(code: str, key: str) -> str:
    """The hint situation of a reconstruction mismatch that explanation `key` fits."""
    if key.startswith(ACTIVATION_KEY):
        return "activation"
    if key in ("float16", "bfloat16"):
        return "half-rounding"
    return key if key in SITUATION_HINTS[code] else "explained"


def _count(fraction: float, channels: int, p: float, t: Thresholds) -> str:
    """ "12 of 16 channels (75%) beyond ..." with the count rule's limits."""
    off = off_channels(fraction, channels)
    return (
        f"{off} of {channels} channels ({_pct(fraction)}) beyond the limits and sample noise, "
        f"p = {_p(p)} from noise alone (limits {_pct(t.stale_fraction)}, "
        f"{count_rule(t).minimum(channels)} channels, p < {_fmt(t.stale_alpha)})"
    )


def _p(p: float) -> str:
    return "< 1e-300" if p < 1e-300 else f"{p:.2g}"


def _momentum_known(m: LayerMetrics) -> bool:
    return m.momentum is None or not math.isnan(m.momentum)


def _over(value: float, limit: float) -> bool:
    """value > limit, where a NaN value counts as over: an unmeasurable check does not pass."""
    return math.isnan(value) or value > limit


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def judge_model(impact, t: Thresholds) -> tuple[Finding, ...]:
    """The output-impact gate: findings about the whole model."""
    if impact is None or math.isinf(t.max_output_change):  # the gate is off by default
        return ()
    if not _over(impact.rel_l2, t.max_output_change):
        return ()
    top1 = (
        "" if impact.top1_agreement is None else f", top-1 agreement {_pct(impact.top1_agreement)}"
    )
    return (
        Finding(
            MODEL,
            "output-change",
            Severity.FAIL,
            f"recalibrating the running stats ({impact.regime} regime) changes the eval output "
            f"by {_fmt(impact.rel_l2)} relative L2 (limit {_fmt(t.max_output_change)}), max abs "
            f"{_fmt(impact.max_abs)}{top1}",
            hint("output-change"),
            impact.rel_l2,
            t.max_output_change,
        ),
    )


def weigh_evidence(findings: tuple[Finding, ...], evidence) -> tuple[Finding, ...]:
    """Stale findings in the light of the task metric (`bnaudit.measure.evidence.Evidence`).

    When recalibrating to the audit batches lowers the metric beyond noise, the statistics are
    stale relative to these batches only: the weights fit the stored ones. The finding stays,
    as a warning with the measurement, so that the gate does not fail on a model that works;
    when recalibrating raises the metric, the hint says by how much.
    """
    if evidence is None:
        return findings
    out = []
    for f in findings:
        if f.code == "stale-stats" and evidence.worse:
            f = dataclasses.replace(
                f,
                severity=min(f.severity, Severity.WARN),
                message=f"{f.message}; but recalibrating to these batches lowers "
                f"{evidence.change()}",
                hint="the weights fit the stored statistics better than these batches' own: "
                "do not recalibrate to these batches; audit with batches drawn like the training "
                "data",
            )
        elif f.code == "stale-stats" and evidence.better:
            f = dataclasses.replace(f, hint=f"{f.hint}; recalibrating raises {evidence.change()}")
        out.append(f)
    return tuple(out)
