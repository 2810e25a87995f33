"""From a layer's attributes, accumulators and figures to its `LayerMetrics`.

The per-channel work (drift from the running stats, counts, maxima) is `figures_of`'s, for
many layers at once; `measure` adds what needs no tensor: the layer's attributes, the
diagnosis of a reconstruction mismatch, the Bessel and momentum figures.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from bnaudit.core import formulas as F
from bnaudit.core.layers import LayerAttrs
from bnaudit.measure.explain import Diagnosis, Explanation
from bnaudit.measure.statistics import LayerStats
from bnaudit.verdict.drift import Drift, drift, judged
from bnaudit.verdict.figures import Figures, figures, figures_of
from bnaudit.verdict.results import (
    Attributes,
    Drifted,
    LayerMetrics,
    Reconstruction,
    Regime,
    Seen,
    Stored,
    Update,
)
from bnaudit.verdict.thresholds import JUDGED, Thresholds

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
    (
        train_err,
        train_ratio,
        eval_err,
        eval_ratio,
        mean_ratio,
        var_ratio,
        step_shift,
        step_log_var,
    ) = f.maxima
    return LayerMetrics(
        attrs=attributes(a),
        stored=Stored(
            nonfinite_values=f.nonfinite_values,
            negative_var_channels=f.negative_var_channels,
            zero_var_channels=f.zero_var_channels,
            initial_stats=f.initial_stats,
            max_amplification=f.max_amplification,
        ),
        seen=Seen(
            calls=s.train.calls,
            values_per_channel=n,
            batch_size=s.train.min_batch,
            nonfinite_inputs=nonfinite_inputs,
            nonfinite_outputs=nonfinite_outputs,
            measured_at=measured_at,
        ),
        train=Regime(_reconstruction(train_err, train_ratio, train_diagnosis), _stale(f)),
        eval=Regime(_reconstruction(eval_err, eval_ratio, eval_diagnosis), _gap(f)),
        update=Update(
            mean_ratio=mean_ratio,
            var_ratio=var_ratio,
            count_errors=s.update.count_errors,
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
            step_shift=step_shift,
            step_log_var=step_log_var,
        ),
    )


def attributes(a: LayerAttrs) -> Attributes:
    """What the layer is, read off its attributes."""
    buffers = a.buffer_dtype
    return Attributes(
        kind=a.kind.value,
        channels=a.num_features,
        eps=a.eps,
        momentum=a.momentum,
        affine=a.affine,
        track_running_stats=a.has_running_stats,
        num_batches_tracked=a.num_batches_tracked,
        dtype=str(a.dtype).removeprefix("torch."),
        buffer_dtype="" if buffers is None else str(buffers).removeprefix("torch."),
        counter_problem=a.counter_problem,
    )


def _reconstruction(max_err: float, ratio: float, d: Diagnosis | None) -> Reconstruction:
    """One mode's output against the formula, with the best explanation of a mismatch."""
    why = _explanation(d)
    return Reconstruction(max_err, ratio, why.label, why.key, why.max_err, why.ratio)


def behind_small_batches(
    order: Sequence[str], metrics: Mapping[str, LayerMetrics], t: Thresholds
) -> dict[str, LayerMetrics]:
    """`metrics` with the stale comparison withdrawn from layers that run after a layer whose
    batches, smaller than `min_batch`, are worth too few independent values per channel.

    In train mode every BN layer normalises with its batch's statistics: where those are far
    from the population's (`bnaudit.verdict.drift.effective_values`), every layer after it
    sees another input than at the training batch size, although its own batch statistics,
    normalised upstream, look steady. The train/eval gap is not withdrawn: in eval mode the
    layers before normalise with their running statistics, whatever the batch size.
    """
    out = dict(metrics)
    cause = ""
    for name in order:
        m = metrics.get(name)
        if m is None:
            continue
        status = m.train.drift.judged
        if cause and status == JUDGED and m.seen.batch_size < t.min_batch:
            why = (
                f"no: batch size {m.seen.batch_size} < {t.min_batch} and {cause} runs before it "
                "with too few effective values per channel"
            )
            drift = dataclasses.replace(m.train.drift, judged=why)
            out[name] = dataclasses.replace(m, train=dataclasses.replace(m.train, drift=drift))
        elif not cause and "effective values" in status:
            cause = name
    return out


def _stale(f: Figures) -> Drifted:
    """The running stats against the regime they describe (train mode unless --regime eval)."""
    d = f.stale
    return Drifted(
        shift_max=d.shift_max,
        log_var_max=d.log_var_max,
        fraction=d.fraction,
        p=d.p,
        channel=d.channel,
        judged=f.stale_judged,
        shift_median=d.shift_median,
        log_var_median=d.log_var_median,
    )


def _gap(f: Figures) -> Drifted:
    """The running stats against the eval-mode input: the train/eval gap."""
    d = f.gap
    return Drifted(d.shift_max, d.log_var_max, d.fraction, d.p, d.channel, f.gap_judged)


def _explanation(d: Diagnosis | None) -> Explanation:
    best = d.best() if d is not None else None
    return best if best is not None else Explanation("", "", NAN, NAN)
