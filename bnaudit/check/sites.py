"""The audit's call-site stage: per site statistics of the BN modules one forward calls more
than once (`bnaudit.measure.sites`), judged by `bnaudit.verdict.sites`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from bnaudit.check.options import AuditOptions
from bnaudit.measure.passes import Passes
from bnaudit.measure.sites import site_moments
from bnaudit.verdict.results import LayerMetrics
from bnaudit.verdict.sites import CallSites, call_sites

if TYPE_CHECKING:
    from bnaudit.distributed import Ranks


def shared_sites(
    model: nn.Module,
    passes: Passes,
    metrics: dict[str, LayerMetrics],
    options: AuditOptions,
    ranks: Ranks | None,
) -> dict[str, CallSites]:
    """Each shared module's call sites: a module whose calls outnumber the batches is called
    at several sites of one forward. One more train-regime pass over the kept batches, only
    when there is such a module (not under torchrun, nor on synthetic data)."""
    count = passes.count
    shared = [n for n, m in metrics.items() if count and m.seen.calls > count]
    if not shared or ranks is not None or options.synthetic_data:
        return {}
    moments, _ = site_moments(model, passes.batches, passes.layers, shared)
    out = {}
    for name in shared:
        a = metrics[name].attrs
        layer = passes.layers[name]
        if layer.running_mean is None or layer.running_var is None:
            continue
        per_site = [(m.mean, v.mean, int(m.count)) for m, v in moments[name]]
        out[name] = call_sites(
            per_site, layer.running_mean, layer.running_var, a.eps, options.thresholds
        )
    return out
