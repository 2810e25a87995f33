"""The limits of the audit, and the count rule that decides whether a layer's stats are stale."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from bnaudit.verdict.results import Drifted, LayerMetrics
from bnaudit.verdict.significance import CountRule

JUDGED = "yes"  # `Drifted.judged` (stale_judged, gap_judged) when the comparison is meaningful


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


def count_rule(t: Thresholds) -> CountRule:
    return CountRule(t.stale_fraction, t.stale_alpha)


def off_channels(fraction: float, channels: int) -> int:
    """How many channels a fraction of `channels` is (0 when unmeasured)."""
    return round(fraction * channels) if math.isfinite(fraction) else 0


def is_stale(m: LayerMetrics, t: Thresholds) -> bool:
    """Enough channels off, beyond what noise from these batches explains."""
    return _drifted(m.train.drift, m.attrs.channels, t)


def has_gap(m: LayerMetrics, t: Thresholds) -> bool:
    """The same rule for the eval-mode input."""
    return _drifted(m.eval.drift, m.attrs.channels, t)


def _drifted(d: Drifted, channels: int, t: Thresholds) -> bool:
    off = off_channels(d.fraction, channels)
    return d.judged == JUDGED and count_rule(t).holds(off, channels, d.p)
