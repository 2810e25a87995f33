"""Recalibration: precise running statistics computed from sample data (see bnaudit.impact).

`recalibrate` computes them without touching the model; `apply` writes them into a model (a
copy the caller owns), and `updated_state_dict` into a state dict, everything else unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.batches import InputChoice
from bnaudit.engine import AuditOptions, recalibrated_stats, run_passes
from bnaudit.errors import BnauditError


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
) -> Recalibration:
    """Precise statistics for every BN layer (or those matching the `layers` globs).

    num_batches_tracked becomes the number of batches averaged, as after
    torch.optim.swa_utils.update_bn, which is the same kind of average.
    """
    options = AuditOptions(
        impact=False,
        fold=False,
        regime=regime,
        max_batches=max_batches,
        train_mode=train_mode,
        input=choice,
    )
    passes = run_passes(model, batches, options)
    if passes.count == 0:
        raise BnauditError("recalibration needs sample batches: none was given")
    stats, level_passes = recalibrated_stats(passes, regime, model)
    if layers:
        stats = {n: v for n, v in stats.items() if any(fnmatch.fnmatch(n, g) for g in layers)}
        if not stats:
            raise BnauditError(f"--layers {' '.join(layers)}: no BatchNorm layer matches")
    counts = {
        n: passes.count
        for n in stats
        if getattr(passes.layers[n], "num_batches_tracked", None) is not None
    }
    cost = (2 + level_passes) * passes.count
    return Recalibration(stats, counts, regime, passes.count, cost)


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
