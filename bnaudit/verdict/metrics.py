"""From a layer's attributes, accumulators and figures to its `LayerMetrics`.

The per-channel work (drift from the running stats, counts, maxima) is `figures_of`'s, for
many layers at once; `measure` adds what needs no tensor: the layer's attributes, the
diagnosis of a reconstruction mismatch, the Bessel and momentum figures.
"""

from __future__ import annotations

import math
from typing import Any

from bnaudit.core import formulas as F
from bnaudit.core.layers import LayerAttrs
from bnaudit.measure.explain import Diagnosis, Explanation
from bnaudit.measure.statistics import LayerStats
from bnaudit.verdict.drift import Drift, drift, judged
from bnaudit.verdict.figures import Figures, figures, figures_of
from bnaudit.verdict.results import LayerMetrics
from bnaudit.verdict.thresholds import Thresholds

__all__ = ["NAN", "Drift", "Figures", "drift", "figures", "figures_of", "judged", "measure"]

NAN = math.nan


def measure(
    a: LayerAttrs,
    s: LayerStats,
    t: Thresholds,
    *,
    nonfinite_inputs: int = 0,
    nonfinite_outputs: int = 0,
    synthetic: bool = False,
    train_diagnosis: Diagnosis | None = None,
    eval_diagnosis: Diagnosis | None = None,
    regime: str = "train",
    measured_at: str = "",
    figured: Figures | None = None,
) -> LayerMetrics:
    """All metrics of one layer.

    `regime` says which inputs the running stats should describe: "train" (a running average
    of train-mode batches, the default) or "eval" (a model recalibrated for deployment with
    `--regime eval`): staleness is then judged on the eval-mode input, and there is no gap.
    `figured`: the layer's `figures` (with the same `regime` and `synthetic`), when
    `figures_of` computed them with other layers'.
    """
    f = figured if figured is not None else figures(a, s, t, regime, synthetic)
    n = s.train.min_n or s.eval.min_n
    bessel = F.bessel(n) if n else NAN
    nbt = a.num_batches_tracked or 0
    return LayerMetrics(
        **_attributes(a),
        nonfinite_values=f.nonfinite_values,
        negative_var_channels=f.negative_var_channels,
        zero_var_channels=f.zero_var_channels,
        initial_stats=f.initial_stats,
        max_amplification=f.max_amplification,
        calls=s.train.calls,
        values_per_channel=n,
        batch_size=s.train.min_batch,
        nonfinite_inputs=nonfinite_inputs,
        nonfinite_outputs=nonfinite_outputs,
        **_formula(f, s, train_diagnosis, eval_diagnosis),
        **_drifts(f),
        bessel_factor=bessel,
        var_ratio_observed=f.observed,
        eval_scale=1 / math.sqrt(bessel) if n > 1 else NAN,
        # An unknown momentum (a bare state dict) leaves the momentum figures unmeasured.
        init_weight=(
            F.init_weight(a.momentum, nbt)
            if a.has_running_stats and a.num_batches_tracked is not None and a.momentum_known
            else NAN
        ),
        ema_window=F.ema_window(a.momentum, nbt) if a.momentum_known else NAN,
        ema_jitter=f.jitter,
        measured_at=measured_at,
    )


def _attributes(a: LayerAttrs) -> dict[str, Any]:
    """The `LayerMetrics` fields read off the layer's attributes."""
    buffers = a.buffer_dtype
    return {
        "kind": a.kind.value,
        "channels": a.num_features,
        "eps": a.eps,
        "momentum": a.momentum,
        "affine": a.affine,
        "track_running_stats": a.has_running_stats,
        "num_batches_tracked": a.num_batches_tracked,
        "dtype": str(a.dtype).removeprefix("torch."),
        "buffer_dtype": "" if buffers is None else str(buffers).removeprefix("torch."),
        "counter_problem": a.counter_problem,
    }


def _formula(
    f: Figures, s: LayerStats, train: Diagnosis | None, eval_: Diagnosis | None
) -> dict[str, Any]:
    """The `LayerMetrics` fields of the formula checks: reconstruction and update."""
    train_why, eval_why = _explanation(train), _explanation(eval_)
    (
        recon_train_max_err,
        recon_train_ratio,
        recon_eval_max_err,
        recon_eval_ratio,
        update_mean_ratio,
        update_var_ratio,
        step_shift,
        step_log_var,
    ) = f.maxima
    return {
        "recon_train_max_err": recon_train_max_err,
        "recon_train_ratio": recon_train_ratio,
        "recon_eval_max_err": recon_eval_max_err,
        "recon_eval_ratio": recon_eval_ratio,
        "recon_train_explanation": train_why.label,
        "recon_train_explanation_key": train_why.key,
        "recon_train_explanation_err": train_why.max_err,
        "recon_train_explanation_ratio": train_why.ratio,
        "recon_eval_explanation": eval_why.label,
        "recon_eval_explanation_key": eval_why.key,
        "recon_eval_explanation_err": eval_why.max_err,
        "recon_eval_explanation_ratio": eval_why.ratio,
        "update_mean_ratio": update_mean_ratio,
        "update_var_ratio": update_var_ratio,
        "update_count_errors": s.update.count_errors,
        "step_shift": step_shift,
        "step_log_var": step_log_var,
    }


def _drifts(f: Figures) -> dict[str, Any]:
    """The `LayerMetrics` fields of the stale comparison and of the train/eval gap."""
    stale, gap = f.stale, f.gap
    return {
        "stale_shift_max": stale.shift_max,
        "stale_shift_median": stale.shift_median,
        "stale_log_var_max": stale.log_var_max,
        "stale_log_var_median": stale.log_var_median,
        "stale_fraction": stale.fraction,
        "stale_p": stale.p,
        "stale_channel": stale.channel,
        "stale_judged": f.stale_judged,
        "gap_shift_max": gap.shift_max,
        "gap_log_var_max": gap.log_var_max,
        "gap_fraction": gap.fraction,
        "gap_p": gap.p,
        "gap_channel": gap.channel,
        "gap_judged": f.gap_judged,
    }


def _explanation(d: Diagnosis | None) -> Explanation:
    best = d.best() if d is not None else None
    return best if best is not None else Explanation("", "", NAN, NAN)
