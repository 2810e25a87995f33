"""What one BN layer did during a training step, read from its own buffers around each call.

A forward pre-hook notes the running mean, the counter and the batch mean before the call; the
forward hook reads the buffers after it. Everything stays on the layer's device as one small
row per call, so a watched step costs a few tiny kernels per layer and one transfer to the
host at its end (`Probe.take` of every layer, stacked), not a synchronisation per layer. Each
train-mode call is also placed, with counters only: in the model's own forward (the j-th call
of one forward is call site j) or outside it (a recomputation during backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.watching.forwards import Forwards

# The columns of a call's row: the counter's growth, the two sums of the implied momentum
# (Σ Δμ·d and Σ d², d = batch mean − running mean before), the largest |Δμ|, the counter after
# the call, whether the batch mean was finite, whether the running stats are finite after.
COUNT, NUM, DEN, MOVED, AFTER, BATCH_FINITE, STATS_FINITE = range(7)
WIDTH = 7


@dataclass(frozen=True)
class Call:
    """One train-mode forward of one layer, as its buffers tell it."""

    counted: float  # num_batches_tracked after − before (NaN: the layer has no counter)
    implied_momentum: float  # Σ Δμ·d / Σ d²; NaN when d is all zero or not finite
    moved: float  # max |Δμ| over channels
    counter_after: float
    batch_finite: bool
    stats_finite: bool

    @property
    def updated(self) -> bool:
        """The call updated the running statistics: its counter grew, or its running mean
        moved (a forward calling F.batch_norm itself leaves the counter alone)."""
        return self.counted > 0 or self.moved > 0

    @classmethod
    def from_row(cls, row: list[float]) -> Call:
        num, den = row[NUM], row[DEN]
        implied = num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else math.nan
        return cls(
            row[COUNT],
            implied,
            row[MOVED],
            row[AFTER],
            row[BATCH_FINITE] > 0,
            row[STATS_FINITE] > 0,
        )


@dataclass(frozen=True)
class Taken:
    """What one layer's hooks recorded in a step."""

    train_calls: int
    eval_calls: int
    outside_calls: int  # train-mode calls outside the model's own forward
    sites: int  # most train-mode calls within one forward of the model (0: none seen in one)
    rows: list[Tensor]


class Probe:
    """The hooks on one BN layer: counts its calls by mode and, while `on`, keeps one row per
    train-mode call. `take()` hands over what the step recorded and starts the next."""

    def __init__(self, name: str, module: nn.Module, forwards: Forwards) -> None:
        self.name, self.module, self.forwards = name, module, forwards
        self.on = False
        self.train_calls = self.eval_calls = self.outside_calls = self.sites = 0
        self._forward = self._in_forward = 0  # the model's forward last seen, calls within it
        self.rows: list[Tensor] = []
        self._before: tuple[Tensor, Tensor | None, Tensor] | None = None
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.on:
            return
        if not module.training:
            self.eval_calls += 1
            return
        self.train_calls += 1
        self._place()
        x = args[0] if args else None
        mean = getattr(module, "running_mean", None)
        if not isinstance(x, Tensor) or not isinstance(mean, Tensor) or x.dim() < 2:
            self._before = None
            return
        dims = [d for d in range(x.dim()) if d != 1]
        with torch.no_grad():
            batch_mean = x.detach().mean(dims, dtype=torch.float32)
            counter = getattr(module, "num_batches_tracked", None)
            counter = counter.detach().clone() if isinstance(counter, Tensor) else None
            self._before = (mean.detach().float().clone(), counter, batch_mean)

    def _place(self) -> None:
        """Count the call as the next site of the model's running forward, or as outside it."""
        f = self.forwards
        if not f.depth:
            self.outside_calls += 1
            return
        if self._forward != f.number:
            self._forward, self._in_forward = f.number, 0
        self._in_forward += 1
        self.sites = max(self.sites, self._in_forward)

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._before is None:
            return
        before, counter_before, batch_mean = self._before
        self._before = None
        with torch.no_grad():
            after = module.running_mean.detach().float()
            var = module.running_var.detach()
            delta, d = after - before, batch_mean - before
            counter = getattr(module, "num_batches_tracked", None)
            if counter_before is not None and isinstance(counter, Tensor):
                counted = (counter - counter_before).double().reshape(())
                now = counter.double().reshape(())
            else:
                counted = now = after.new_tensor(math.nan, dtype=torch.float64)
            row = torch.stack(
                [
                    counted,
                    (delta * d).sum().double(),
                    (d * d).sum().double(),
                    delta.abs().amax().double(),
                    now,
                    torch.isfinite(batch_mean).all().double(),
                    (torch.isfinite(after).all() & torch.isfinite(var).all()).double(),
                ]
            )
        self.rows.append(row)

    def take(self) -> Taken:
        """What the hooks recorded since the last take; starts afresh."""
        out = Taken(self.train_calls, self.eval_calls, self.outside_calls, self.sites, self.rows)
        self.train_calls = self.eval_calls = self.outside_calls = self.sites = 0
        self.rows = []
        self._before = None
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def read_calls(probes: list[Probe], rows: list[list[Tensor]]) -> list[list[Call]]:
    """Every probe's rows as `Call`s, with one transfer to the host for all of them."""
    flat = [r for per in rows for r in per]
    if not flat:
        return [[] for _ in probes]
    devices = {r.device for r in flat}
    if len(devices) > 1:  # a model split over devices: gather on the CPU
        flat = [r.cpu() for r in flat]
    values = torch.stack(flat).tolist()
    out, i = [], 0
    for per in rows:
        out.append([Call.from_row(v) for v in values[i : i + len(per)]])
        i += len(per)
    return out
