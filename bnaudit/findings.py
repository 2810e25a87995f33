"""Thresholds, and the rules that turn a layer's metrics into findings.

Every rule handles non-finite numbers explicitly: NaN compares false, so `value > limit` alone
would let a NaN through.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from bnaudit.measure.explain import ACTIVATION_KEY
from bnaudit.results import MODEL, Finding, LayerMetrics, Severity
from bnaudit.significance import CountRule

# Shared with fold.py and explain.py; kept here so that judging needs no torch.
FLOAT16_MAX = 65504.0
MIN_INT8_LEVELS = 8.0  # int8 levels a folded channel keeps, below which the fold is at risk

JUDGED = "yes"
_FORMULA_CODES = frozenset({"recon-train", "recon-eval", "running-update"})

# Stable codes, in the README's order.
CODES: tuple[str, ...] = (
    "recon-train",
    "recon-eval",
    "running-update",
    "stale-stats",
    "train-eval-gap",
    "init-stats",
    "nonfinite",
    "bad-var",
    "tiny-var",
    "var-bias",
    "momentum-warmup",
    "momentum-convention",
    "no-running-stats",
    "nonstandard-forward",
    "not-reached",
    "fold-mismatch",
    "fold-risk",
    "output-change",
    "half-buffers",
    "no-counter",
    "bad-counter",
    "not-audited",
)
# `bnaudit diff`'s codes (bnaudit.diff): judged from two checkpoints, not from one.
DIFF_CODES: tuple[str, ...] = (
    "stats-not-updated",
    "frozen-stats-updated",
    "counter-reset",
    "unmatched-layer",
)
ALL_CODES = CODES + DIFF_CODES

# How to fix a finding. A code whose messages all call for the same fix has one hint here; a code
# whose messages describe different situations has one hint per situation (SITUATION_HINTS), so
# that a fix never contradicts the message it follows. `{layer}` and `{upstream}` are filled in.
HINTS: dict[str, str] = {
    "tiny-var": "near-zero running variance with large gamma amplifies noise and can overflow "
    "float16: check for dead channels, raise eps, or prune the channel",
    "var-bias": "expected with this few values per channel; validate in eval mode, or use larger "
    "batches or GroupNorm for this layer",
    "momentum-convention": "PyTorch momentum is the weight of the new batch (Keras 0.99 = PyTorch "
    "0.01): set momentum = 1 - keras_momentum and recalibrate",
    "no-running-stats": "eval output depends on the batch and fails on a single sample: set "
    "track_running_stats=True and calibrate, unless this is intended",
    "not-reached": "the layer did not run on the sample batches: check the data reaches it",
    "fold-mismatch": "the folded conv does not reproduce conv -> BN in eval mode: do not deploy "
    "the folded model before finding out why (see the layer's recon-eval)",
    "output-change": "recalibrate the flagged layers (bnaudit recalibrate) and audit again; "
    "--attribution shows which layers matter",
    "half-buffers": "keep BatchNorm buffers in float32 (torch.autocast does, model.half() does "
    "not): convert the BN layers with .float() and recalibrate",
    "no-counter": "nothing to do for a FrozenBatchNorm; a BatchNorm loads it as T = 0, which "
    "restarts a cumulative average (momentum=None): recalibrate before training on",
    "bad-counter": "the counter was corrupted or written by hand; load_state_dict truncates it "
    "into the model's int64 buffer (NaN becomes garbage), which breaks momentum=None averaging: "
    "recalibrate (update_bn and bnaudit recalibrate set it to the batches averaged)",
    "not-audited": "a BatchNorm layer has 1-D floating running_mean and running_var of one length, "
    "and weight and bias of that length: find what rewrote these tensors (load_state_dict refuses "
    "them too); if the module is not BatchNorm, accept the finding with an ignore entry and a "
    "reason",
}
_PRUNE = "or clamp/prune the channels with huge gamma/sqrt(var + eps) before folding"
# A reconstruction mismatch that one known mistake explains (bnaudit.measure.explain keys): its fix.
_EXPLAINED = {
    "eps-outside": "eps is added to the standard deviation, not to the variance: normalise by "
    "sqrt(var + eps) in the layer's forward (or in the code that patches it)",
    "eps": "the forward uses another eps than the layer's eps attribute: make the two agree, or "
    "folding and export compute something else than the model",
    "no-affine": "gamma and beta are not applied: the forward drops the affine step although the "
    "layer has weight and bias; apply them, or build the layer with affine=False",
    "per-sample": "the statistics are per sample (an instance norm), not over the batch: the "
    "layer's forward is not BatchNorm's; check its class and any code patching it",
    "batch-dim-only": "the statistics are over the batch dim only, not over the spatial dims "
    "too: the forward reduces over the wrong dims",
    "channels-last": "the statistics are over the last dim: the input reaches the layer "
    "channels-last (NHWC); permute it to NCHW before this layer",
    "half-rounding": "the output is BN computed in half precision: look for autocast or a "
    "float16/bfloat16 cast in or around this layer; keep BatchNorm in float32",
    "activation": "the output is BN followed by an activation, yet the class does not override "
    "forward: a patched forward or a forward hook applies it; audit the plain layer",
    "explained": "the message names what the layer computes instead: fix that in its forward, or "
    "in the code that patches it",
    "unexplained": "none of the known mistakes explains it: compare the layer's forward with the "
    "formula `bnaudit show CHECKPOINT --layer {layer}` prints, and look for a patched forward",
}
SITUATION_HINTS: dict[str, dict[str, str]] = {
    "recon-train": {
        "undiagnosed": "the train-mode output is not BN with batch statistics: look for a "
        "patched or overridden forward",
        "unbiased": "the forward normalises with the unbiased batch variance (divide by N-1); "
        "train mode uses the biased one (divide by N): use var(unbiased=False) or F.batch_norm",
        "running-in-train": "train mode normalises with the running stats: the forward takes the "
        "eval path while training (e.g. F.batch_norm with training=False); use batch statistics",
        **_EXPLAINED,
    },
    "recon-eval": {
        "undiagnosed": "the eval-mode output is not BN with the stored running statistics: look "
        "for a patched or overridden forward",
        "batch-in-eval": "eval mode normalises with batch statistics: the forward ignores the "
        "running stats (e.g. F.batch_norm with training=True); use them in eval mode",
        **_EXPLAINED,
    },
    "running-update": {
        "stats": "a train step does not update the running stats as (1-m)*old + m*batch "
        "(unbiased variance): look for custom momentum or update code",
        "counter": "num_batches_tracked does not grow by exactly 1 per train-mode forward: look "
        "for custom update code; with momentum=None the average's weights depend on it",
    },
    "stale-stats": {
        "stale": "the running stats are stale relative to these batches: if these are the data "
        "the model serves, recalibrate on them, e.g. torch.optim.swa_utils.update_bn(loader, "
        "model), then save the checkpoint again",
        "first": "this is among the first BN layers to run and it already disagrees with these "
        "batches: first check they are preprocessed as in training (normalisation, resizing, "
        "channel order, domain); only if they are, recalibrate relative to them "
        "(torch.optim.swa_utils.update_bn(loader, model)) and save the checkpoint again",
    },
    "train-eval-gap": {
        "gap": "stats fit train mode but not what the deployed (eval) model sees; recalibrate "
        "in eval mode layer by layer, or normalise over larger batches",
        "downstream": "recalibrate {upstream} first, then audit again",
    },
    "init-stats": {
        "never-updated": "the layer never ran in train mode on data: calibrate it "
        "(torch.optim.swa_utils.update_bn) before saving",
        "reset": "the stats were reset or overwritten after training while the counter was "
        "kept (a re-created layer, a partial state-dict load): recalibrate before saving",
        "frozen": "a frozen layer holding the initial values: the checkpoint's statistics were "
        "not loaded into it (check the state-dict keys), or its source was never calibrated",
        "no-count": "the stats themselves may be fine; a cumulative average (momentum=None) "
        "restarts at T = 0 and the next train batch overwrites them: set num_batches_tracked "
        "or recalibrate before training on",
    },
    "nonfinite": {
        "values": "restore an earlier checkpoint or recalibrate; look for overflow in training",
        "outputs": "weights and stats are finite, yet the layer turns finite inputs into NaN/Inf: "
        "see its other findings (running_var <= 0, huge gamma/sqrt(var + eps)) and look for "
        "float16 overflow",
    },
    "bad-var": {
        "negative": "a running variance is never negative after a real update: the buffer was "
        "corrupted or written by hand; recalibrate",
        "zero": "an exactly zero running variance comes from a channel whose input was constant "
        "in training (dead or pruned) or from a buffer written by hand: prune the channel, or "
        "recalibrate",
    },
    "momentum-warmup": {
        "unverified": "if the stats are this EMA, the initial 0/1 values still weigh in them: "
        "calibrate with more batches; a cumulative average over T batches (update_bn) carries "
        "none: an audit with data tells which",
        "stale": "the stats do not fit the data and still carry their initial 0/1 values: "
        "calibrate with more batches",
        "verified": "nothing to fix: the stats fit the data, as a cumulative average over T "
        "batches (update_bn) leaves them; training on starts its EMA from them",
    },
    "nonstandard-forward": {
        "mismatch": "the override does not compute BN: its recon/running-update findings say "
        "what it does instead; fix the forward, or accept it with an ignore entry",
        "variant": "nothing to fix if intended: the normalisation is exact and the formula "
        "checks allowed for what the override adds",
        "inside": "nothing to fix if intended: the normalisation is exact where it happens, the "
        "input of the layer's dropout or activation; what those add is not BN",
        "plain": "nothing to fix: the override computes plain BN on these batches, and the "
        "formula checks test what it computes",
        "unchecked": "the layer did not run on the sample batches, so what the override "
        "computes is unchecked: feed data that reaches it",
    },
    "fold-risk": {
        "float16": "keep the folded model in float32 (or bfloat16), " + _PRUNE,
        "int8": "quantize the folded weights per channel, not per tensor, " + _PRUNE,
    },
}


# The fixes for DIFF_CODES, with the same conventions: one hint, or one per situation.
DIFF_HINTS: dict[str, str] = {
    "frozen-stats-updated": "keep frozen BN in eval mode: call .eval() on the frozen part after "
    "every model.train() (or use FrozenBatchNorm2d); nothing to fix if it was not meant frozen",
    "unmatched-layer": "the checkpoints hold different layers here, which were not compared: "
    "compare checkpoints of one architecture, or accept it if the architecture changed on "
    "purpose",
}
DIFF_SITUATION_HINTS: dict[str, dict[str, str]] = {
    "stats-not-updated": {
        "stale": "recalibrate on training-like data (bnaudit recalibrate, or "
        "torch.optim.swa_utils.update_bn(loader, model)), or fine-tune with BN in train mode; "
        "if BN was kept in eval mode on purpose, the weights were trained with these statistics: "
        "compare the task metric before and after recalibrating (bnaudit check with labelled "
        "--data) before you do",
        "frozen": "nothing to fix if the layer is a FrozenBatchNorm on purpose (detectron2, "
        "torchvision detection): the weights were fine-tuned with these statistics",
    },
    "counter-reset": {
        "recalibrated": "nothing to fix if this is a recalibration: update_bn and bnaudit "
        "recalibrate set num_batches_tracked to the number of batches averaged",
        "reset": "the counter restarted (a re-created model, a partial state-dict load): with "
        "momentum=None the next train batch weighs 1/T, so restore the counter or recalibrate",
    },
}


def diff_hint(code: str, situation: str = "") -> str:
    """The fix for a DIFF_CODES finding in `situation` ("": a code with one hint)."""
    return DIFF_SITUATION_HINTS[code][situation] if situation else DIFF_HINTS[code]


def hint(code: str, situation: str = "", **fields: str) -> str:
    """The fix for `code` in `situation` ("": a code with one hint), its fields filled in."""
    text = SITUATION_HINTS[code][situation] if situation else HINTS[code]
    return text.format(**fields) if fields else text


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
