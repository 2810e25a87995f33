"""Small layers measured together: one set of tensor operations for many BN layers.

Measuring a small activation (a BatchNorm1d over a few thousand values, say) costs far more in
per-operation overhead than in arithmetic: a few dozen tensor operations per call, whatever the
size. So the hook of a standard BN layer keeps copies of its small activations, and after the
forward pass the calls that share a batch shape are measured at once, their channels side by
side ([B, C1 + C2 + ..., ...]). Every formula is per channel, so this is the same arithmetic as
one layer at a time; the accumulators are kept side by side too and split into each layer's at
the end. A group whose values are not all finite, or that misses the formula somewhere, is
measured again one layer at a time, so findings and diagnoses are exactly the per-layer ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bnaudit import formulas as F
from bnaudit import fused
from bnaudit.layers import Kind, LayerAttrs
from bnaudit.rows import Rows, UpdateCheck
from bnaudit.statistics import LayerStats

if TYPE_CHECKING:
    from bnaudit.probe import Probe

# Activations of at most this many values are measured in groups; above it the arithmetic
# dominates and a layer is measured in its own hook.
SMALL_VALUES = 1 << 15
# Copies kept before a group is measured even in the middle of a forward pass: memory stays
# bounded however many small layers a model has.
PENDING_VALUES = 1 << 22
# The running mean and variance one train-mode call left, and num_batches_tracked (or None).
Update = tuple[Tensor, Tensor, int | None]


@dataclass(frozen=True)
class _Call:
    probe: Probe
    train: bool  # the train-mode pass, else the eval-mode one
    x: Tensor
    y: Tensor
    update: Update | None


class Deferred:
    """The small-activation calls of one forward pass, and the groups that measure them."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.values = 0
        self.groups: dict[tuple[Any, ...], _Group] = {}

    @staticmethod
    def takes(x: Tensor) -> bool:
        return x.is_floating_point() and 0 < x.numel() <= SMALL_VALUES

    def add(self, probe: Probe, train: bool, x: Tensor, y: Tensor, update: Update | None) -> None:
        """One call of a layer: copies of its input and output, and the stats it left."""
        self.calls.append(_Call(probe, train, x, y, update))
        self.values += 2 * x.numel()
        if self.values > PENDING_VALUES:
            self.flush()

    def flush(self) -> None:
        """Measure every pending call, grouped by what the arithmetic needs to share."""
        calls, self.calls, self.values = self.calls, [], 0
        by_kind: dict[_Kind, list[_Call]] = {}
        for call in calls:
            by_kind.setdefault(_kind(call), []).append(call)
        for kind, same in by_kind.items():
            key = (kind, tuple(id(c.probe) for c in same))
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _Group([c.probe for c in same], kind)
            group.measure(same)

    def finish(self) -> None:
        """Hand each layer its share of the groups' accumulators."""
        self.flush()
        for group in self.groups.values():
            group.rows.fold(group.stats)
            for probe, channels in zip(group.probes, group.slices, strict=True):
                probe.stats.merge(group.stats.channels(channels))
        self.groups.clear()


@dataclass(frozen=True)
class _Kind:
    """What calls measured together share: regime, statistics, batch shape, dtypes, device."""

    train: bool
    uses_batch: bool  # the output normalises with batch statistics, else running ones
    batch: int
    inner: tuple[int, ...]  # the dims after the channels
    dtype: torch.dtype
    out_dtype: torch.dtype
    device: torch.device
    update_dtype: torch.dtype | None  # the running buffers' dtype when the update is checked


def _kind(call: _Call) -> _Kind:
    x = call.x
    return _Kind(
        call.train,
        _uses_batch(call.probe.attrs, call.train),
        x.shape[0],
        tuple(x.shape[2:]),
        x.dtype,
        call.y.dtype,
        x.device,
        None if call.update is None else call.update[0].dtype,
    )


def _uses_batch(a: LayerAttrs, train: bool) -> bool:
    """Whether the output normalises with the batch's statistics (else the running ones)."""
    return a.kind is not Kind.FROZEN and (train or not a.has_running_stats)


class _Group:
    """Layers measured side by side: their attributes laid out along the channels."""

    def __init__(self, probes: list[Probe], kind: _Kind) -> None:
        self.train, self.uses_batch, self.update_dtype = (
            kind.train,
            kind.uses_batch,
            kind.update_dtype,
        )
        device = kind.device
        self.probes = probes
        attrs = [p.attrs for p in probes]
        sizes = [a.num_features for a in attrs]
        self.slices = [
            slice(start, start + size)
            for start, size in zip(itertools.accumulate(sizes, initial=0), sizes, strict=False)
        ]

        def per_channel(
            value: Callable[[LayerAttrs], Tensor | float | None], fill: float
        ) -> Tensor:
            parts = []
            for a in attrs:
                v = value(a)
                if not isinstance(v, Tensor):
                    v = torch.full((a.num_features,), fill if v is None else v, dtype=torch.float64)
                parts.append(v.to(device))
            return torch.cat(parts)

        # Absent γ, β are 1 and 0: multiplying by 1 and adding 0 are exact.
        self.weight = per_channel(lambda a: a.weight, 1.0)
        self.bias = per_channel(lambda a: a.bias, 0.0)
        self.eps = per_channel(lambda a: a.eps, 0.0)
        if not self.uses_batch or self.update_dtype is not None:
            self.running_mean = per_channel(lambda a: a.running_mean, math.nan)
            self.running_var = per_channel(lambda a: a.running_var, math.nan)
        if self.update_dtype is not None:
            self.factor = per_channel(
                lambda a: F.update_factor(a.momentum, a.num_batches_tracked or 0), 0.0
            )
            self.expected_t = [
                None if a.num_batches_tracked is None else a.num_batches_tracked + 1 for a in attrs
            ]
        self.stats = LayerStats()
        check = None
        if self.update_dtype is not None:
            check = UpdateCheck(
                self.running_mean, self.running_var, self.factor, self.eps, self.update_dtype
            )
        self.rows = Rows(sum(sizes), check)

    def measure(self, calls: list[_Call]) -> None:
        x = torch.cat([c.x for c in calls], dim=1) if len(calls) > 1 else calls[0].x
        y = torch.cat([c.y for c in calls], dim=1) if len(calls) > 1 else calls[0].y
        running = None if self.uses_batch else (self.running_mean, self.running_var)
        got = fused.measure(x, y, self.weight, self.bias, self.eps, running, y.dtype)
        if not (got.finite and got.worst <= 1):
            # Rare: non-finite values, or a layer that misses the formula. One layer at a time
            # gives the exact per-layer counts and diagnoses.
            for c in calls:
                c.probe.measure_batch(c.x, c.y, self.train, c.update)
            return
        update = None
        if self.update_dtype is not None:
            update = self._count_steps(calls)
        u = max(F.sum_roundoff(c.x) for c in calls)
        key = (self.train, F.values_per_channel(x), x.shape[0], u)
        self.rows.add(self.stats, key, (got.mean, got.var, got.err, got.ratio), update)

    def _count_steps(self, calls: list[_Call]) -> list[Tensor]:
        """Count the steps where T did not become T + 1; the running stats the calls left,
        every layer's mean, then every variance."""
        updates = [c.update for c in calls]
        assert all(u is not None for u in updates)
        for c, expected in zip(calls, self.expected_t, strict=True):
            got = c.update[2] if c.update is not None else None
            if expected is not None and got is not None and got != expected:
                c.probe.stats.update.count_errors += 1
        return [u[0] for u in updates if u is not None] + [u[1] for u in updates if u is not None]
