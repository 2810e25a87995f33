"""Recalibration: precise running statistics computed from sample data (see bnaudit.measure.impact).

`recalibrate` computes them without touching the model; `apply` writes them into a model (a
copy the caller owns), and `updated_state_dict` into a state dict, everything else unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.core.errors import BnauditError, NothingToAudit
from bnaudit.core.layers import LayerKind, find_bn_layers, layer_kind
from bnaudit.inputs.calls import InputChoice
from bnaudit.measure.impact import Across, precise_stats
from bnaudit.measure.passes import Moved
from bnaudit.measure.progress import (
    RECALIBRATE,
    ProgressFn,
    Ticking,
    batch_count,
    recalibrate_stage,
    ticked,
)


@dataclass(frozen=True)
class Recalibration:
    stats: dict[str, tuple[Tensor, Tensor]]  # layer → (running_mean, running_var)
    counts: dict[str, int]  # layer → num_batches_tracked to store
    regime: str
    batches: int
    forward_passes: int


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    regime: str = "train",
    layers: tuple[str, ...] = (),
    max_batches: int | None = None,
    train_mode: str = "bn",
    choice: InputChoice = None,
    across: Across | None = None,
    progress: ProgressFn | None = None,
) -> Recalibration:
    """Precise statistics for every BN layer (or those matching the `layers` globs).

    Train regime: one train-mode pass per batch with statistics only, the cost of
    torch.optim.swa_utils.update_bn (the batches are streamed, not kept). Eval regime: the
    level-by-level eval passes of `bnaudit.measure.impact.eval_regime_stats`. num_batches_tracked
    becomes the number of batches averaged, as after update_bn, the same kind of average.
    With `across` (torchrun ranks, `bnaudit.distributed`), `batches` are this process's shard
    and the statistics, counts and passes are those of all of them. `progress` is called after
    each batch of every pass (`bnaudit.measure.progress`: "recalibrate", "recalibrate, level K").
    """
    found = find_bn_layers(model)
    if not found:
        raise NothingToAudit(
            "the model has no BatchNorm layer (no torch.nn.modules.batchnorm._BatchNorm)"
        )
    modules = dict(found)
    names = [
        n
        for n, m in found
        if layer_kind(m) is not LayerKind.FROZEN
        and m.running_mean is not None
        and m.running_var is not None
    ]
    if regime == "train" and layers:
        # A layer's train-mode input does not depend on the other layers' running statistics;
        # in the eval regime it does, so there every layer is recalibrated, then filtered.
        names = [n for n in names if _matches(n, layers)]
    calls = Moved(model, batches, max_batches, choice)
    counted = _Counting(calls)
    source: Iterable[Any] = counted
    if progress is not None and regime == "eval":  # listed anyway: each level replays them
        listed = list(counted)
        source = Ticking(listed, len(listed), progress, recalibrate_stage)
    elif progress is not None:
        total = batch_count(batches, max_batches)
        source = ticked(counted, total, progress, RECALIBRATE)
    stats, passes = precise_stats(model, source, modules, names, regime, train_mode, across)
    count = counted.count
    if across is not None:
        count, passes = across.total(count), across.total(passes)
    if count == 0:
        raise BnauditError("recalibration needs sample batches: none was given")
    if layers:
        stats = {n: v for n, v in stats.items() if _matches(n, layers)}
        if not stats:
            raise BnauditError(f"--layers {' '.join(layers)}: no BatchNorm layer matches")
    counts = {
        n: count for n in stats if getattr(modules[n], "num_batches_tracked", None) is not None
    }
    return Recalibration(stats, counts, regime, count, passes)


def _matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, g) for g in globs)


class _Counting:
    """Iterates `items` and counts the distinct items seen (over several iterations)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self.items):
            self.count = max(self.count, i + 1)
            yield item


def apply(model: nn.Module, r: Recalibration) -> None:
    """Write the statistics into `model` (the caller's copy: this one is meant to change)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (mean, var) in r.stats.items():
            modules[name].running_mean.copy_(mean)
            modules[name].running_var.copy_(var)
        for name, count in r.counts.items():
            modules[name].num_batches_tracked.fill_(count)


def updated_state_dict(
    state_dict: dict[str, Tensor], r: Recalibration, prefix: str = ""
) -> dict[str, Tensor]:
    """A copy of `state_dict` with the new statistics; every other entry is the same object."""
    out = type(state_dict)(state_dict)
    if hasattr(state_dict, "_metadata"):
        out._metadata = state_dict._metadata  # type: ignore[attr-defined]
    for name, (mean, var) in r.stats.items():
        for key, value in (("running_mean", mean), ("running_var", var)):
            full = f"{prefix}{name}.{key}"
            old = state_dict[full]
            out[full] = value.detach().to(device=old.device, dtype=old.dtype).clone()
    for name, count in r.counts.items():
        full = f"{prefix}{name}.num_batches_tracked"
        if full in state_dict:
            out[full] = torch.tensor(count, dtype=state_dict[full].dtype)
    return out
