"""Per call site statistics of a BN module that one forward calls more than once.

A module applied at k places of the forward (a U-Net's `DoubleConv` reusing one `BatchNorm2d`
after both of its convs) normalises k different inputs with one pair of running statistics.
The audit's probe pools every call of a module; this pass keeps them apart: the j-th call of a
module within one forward is its site j. Each site gets what its own running statistics would
estimate, measured as `bnaudit.measure.impact.precise_stats` measures them (train-mode BN
layers, batch means and unbiased batch variances), one pass over the batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from bnaudit.core.layers import preserved
from bnaudit.inputs.calls import call_model
from bnaudit.measure.impact import _InputMoments
from bnaudit.measure.statistics import Moments

SiteMoments = dict[str, tuple[tuple[Moments, Moments], ...]]  # layer → per site (means, vars)


class _Sites:
    """A pre-hook that sends the j-th call of its module within one forward to site j."""

    def __init__(self) -> None:
        self.call = 0
        self.sites: list[_InputMoments] = []
        self.moments: list[tuple[Moments, Moments]] = []

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if self.call == len(self.sites):
            pair = (Moments(), Moments())
            self.moments.append(pair)
            self.sites.append(_InputMoments(module, *pair))
        self.sites[self.call](module, inputs)
        self.call += 1


def site_moments(
    model: nn.Module,
    calls: Iterable[Any],
    layers: dict[str, nn.Module],
    names: Sequence[str],
) -> tuple[SiteMoments, int]:
    """What each call site of `names` would teach running statistics, on these batches, in the
    audit's train-mode regime (only the BN layers in train mode); (moments, batches run). The
    model is left as it was."""
    hooks = {n: _Sites() for n in names}
    bn = list(layers.items())
    count = 0
    with preserved(model, bn), torch.no_grad():
        model.eval()
        for _, m in bn:
            m.training = True  # as the audit's train-mode pass: dropout and friends stay off
        handles = [layers[n].register_forward_pre_hook(h) for n, h in hooks.items()]
        try:
            for c in calls:
                for h in hooks.values():
                    h.call = 0
                call_model(model, c)
                count += 1
        finally:
            for handle in handles:
                handle.remove()
    for h in hooks.values():
        for site in h.sites:
            site.fold()
    return {n: tuple(h.moments) for n, h in hooks.items()}, count
