"""How far a training checkpoint says training went: its optimizer step count, found without
running anything in the objects torch.load gave back.

Where training scripts keep it, in the order tried:
- Lightning's top-level `global_step` (optimizer steps);
- an optimizer's state dict (`state` and `param_groups`, at the top level, one level down or in
  Lightning's `optimizer_states` list): the largest per-parameter `step` (Adam, AdamW, RAdam,
  NAdam, Adamax, Adagrad ... keep one);
- a top-level `step`, `global_step`, `iteration`, `iter` or `num_updates`;
- a top-level `epoch`, which needs the steps per epoch (`--steps-per-epoch`).
Every value is untrusted: one that is not a count (a string, negative, NaN, huge, a tensor of
more than one value) is reported as such, never used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bnaudit.core.untrusted import quote, short_repr

STEP_KEYS = ("step", "global_step", "iteration", "iter", "num_updates")
EPOCH_KEY = "epoch"
LIGHTNING_STEP = "global_step"
OPTIMIZER_LISTS = ("optimizer_states", "optimizers")
# More optimizer steps than any training run takes (10^12 at 10^4 steps a second is 3 years):
# a larger value is not a step count.
MAX_STEPS = 10**12
_DEPTH = 2  # optimizer state dicts are searched this deep


@dataclass(frozen=True)
class StepCount:
    """The step count a checkpoint holds, and where it was found."""

    source: str  # "optimizer state 'step' (Adam-style, largest of 12 parameters) at 'optimizer'"
    steps: int | None = None  # optimizer steps; None: see `problem`, or `epochs`
    epochs: int | None = None  # only an epoch was found: steps need the steps per epoch
    problem: str = ""  # why the value found is not a count ("" when it is)

    @property
    def found(self) -> bool:
        """False: a training checkpoint (a dict around the state dict) without a step count."""
        return bool(self.source)

    def resolved(self, steps_per_epoch: int | None) -> StepCount:
        """Steps from the epoch and `steps_per_epoch` where only an epoch was found."""
        if self.epochs is None or self.steps is not None or steps_per_epoch is None:
            return self
        return StepCount(
            f"{self.source} x {steps_per_epoch} steps per epoch (--steps-per-epoch)",
            steps=self.epochs * steps_per_epoch,
            epochs=self.epochs,
        )


def step_count_of(obj: Any) -> StepCount | None:
    """`find_step_count`, and None where looking fails."""
    try:
        return find_step_count(obj)
    except Exception:  # an object unpickled with --trust may fail any lookup: no step count
        return None


def find_step_count(obj: Any) -> StepCount | None:
    """The step count of a loaded checkpoint; `StepCount("")` (not `found`) for a dict holding
    none; None for a bare state dict or a module, which never hold one."""
    if not isinstance(obj, Mapping) or all(isinstance(v, Tensor) for v in obj.values()):
        return None
    if LIGHTNING_STEP in obj and "state_dict" in obj:
        return _counted(obj[LIGHTNING_STEP], f"Lightning's {quote(LIGHTNING_STEP)}")
    for where, state in _optimizer_states(obj, "", 0):
        found = _optimizer_step(state, where)
        if found is not None:
            return found
    for key in STEP_KEYS:
        if key in obj:
            return _counted(obj[key], f"top-level {quote(key)}")
    if EPOCH_KEY in obj:
        epoch = _counted(obj[EPOCH_KEY], f"top-level {quote(EPOCH_KEY)}")
        if epoch.problem:
            return epoch
        return StepCount(epoch.source, epochs=epoch.steps)
    return StepCount("")


def _optimizer_states(obj: Any, where: str, depth: int) -> Iterator[tuple[str, Mapping]]:
    """(where, state dict) of every optimizer state dict in `obj`, shallowest first."""
    if not isinstance(obj, Mapping) or depth > _DEPTH:
        return
    if "state" in obj and "param_groups" in obj and isinstance(obj["state"], Mapping):
        yield where or "the top level", obj
        return
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        here = f"{where}.{key}" if where else key
        if isinstance(value, Mapping):
            yield from _optimizer_states(value, here, depth + 1)
        elif key in OPTIMIZER_LISTS and isinstance(value, (list, tuple)) and value:
            yield from _optimizer_states(value[0], f"{here}[0]", depth + 1)


def _optimizer_step(state: Mapping, where: str) -> StepCount | None:
    """The largest per-parameter `step` of an optimizer state dict (a parameter added later,
    or frozen for a while, has fewer); None when its optimizer keeps none (SGD)."""
    per_param = state["state"]
    values = [s["step"] for s in per_param.values() if isinstance(s, Mapping) and "step" in s]
    if not values:
        return None
    source = (
        f"optimizer state {quote('step')} at {quote(where)} (largest over {len(values)} "
        "parameter(s))"
    )
    counts = [_counted(v, source) for v in values]
    bad = next((c for c in counts if c.problem), None)
    if bad is not None:
        return bad
    return StepCount(source, steps=max(c.steps for c in counts if c.steps is not None))


def _counted(value: Any, source: str) -> StepCount:
    """`value` as a step count, or why it is not one."""
    number, problem = as_count(value)
    return StepCount(source, steps=number, problem=problem)


def as_count(value: Any) -> tuple[int | None, str]:
    """(count, "") for a whole number in [0, MAX_STEPS], else (None, why it is not one)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return None, f"a tensor of shape {tuple(value.shape)}, not one value"
        if value.dtype == torch.bool or value.is_complex():
            return None, f"a {value.dtype} tensor, not a number"
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"a {type(value).__name__} ({short_repr(value)}), not a number"
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, f"{value} (not finite)"
        if not value.is_integer():
            return None, f"{value:g}, not a whole number"
        value = int(value)
    if value < 0:
        return None, f"{value}, negative"
    if value > MAX_STEPS:
        return None, f"{value:.3g}, more than any training run takes ({MAX_STEPS:.0e})"
    return value, ""
