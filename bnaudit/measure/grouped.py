"""Small layers measured together: one set of tensor operations for many BN layers.

Measuring a small activation (a BatchNorm1d over a few thousand values, say) costs far more in
per-operation overhead than in arithmetic: a few dozen tensor operations per call, whatever the
size. So the hook of a standard BN layer keeps copies of its small activations, and after the
forward pass the calls that share a batch shape are measured at once, their channels side by
side ([B, C1 + C2 + ..., ...]). Every formula is per channel, so this is the same arithmetic as
one layer at a time; the accumulators are kept side by side too and split into each layer's at
the end. A group whose values are not all finite, or that misses the formula somewhere, is
measured again one layer at a time, so findings and diagnoses are exactly the per-layer ones.

On tiny batches one kernel call per group and pass still costs more than its arithmetic, so
consecutive passes that call the same layers with the same shapes are kept as well and measured
in one call, pass after pass along the channels ([B, K·(C1 + C2 + ...), ...]): K rows of the
group. A block that misses is measured again pass by pass, as above. Each layer's calls are
measured in the order they ran, which the diagnosis depends on.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from bnaudit.core import formulas as F
from bnaudit.core.layers import LayerAttrs, LayerKind
from bnaudit.measure import fused
from bnaudit.measure.rows import Rows, UpdateCheck
from bnaudit.measure.statistics import LayerStats
from bnaudit.measure.updates import Update


class Probe(Protocol):
    """What a group needs of a layer's probe (`bnaudit.measure.probe.Probe`)."""

    attrs: LayerAttrs
    stats: LayerStats
    regime: str  # "train" or "eval": the pass being measured

    def measure_batch(self, x: Tensor, y: Tensor, train: bool, update: Update | None) -> None: ...


# Activations of at most this many values are measured in groups; above it a layer is measured
# in its own hook, while x and y are in cache: keeping copies of them (a write, and a read from
# memory) then costs more than a kernel call with prepared arguments (`fused.Prepared`).
SMALL_VALUES = 1 << 13
# Copies kept before a group is measured even in the middle of a forward pass: memory stays
# bounded however many small layers a model has.
PENDING_VALUES = 1 << 22
# Copies of one group's consecutive passes measured in one kernel call: enough passes to make
# the call's fixed cost small, few enough for the copies to stay in cache.
BLOCK_VALUES = 1 << 18
# γ, β, ε and the running mean and variance (None: batch statistics), per channel of a group.
_Attributes = tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]


@dataclass(slots=True)
class _Call:
    probe: Probe
    train: bool  # the train-mode pass, else the eval-mode one
    x: Tensor
    y: Tensor
    update: Update | None


class Deferred:
    """The small-activation calls of the forward passes, and the groups that measure them."""

    def __init__(self, settle: Callable[[], None]) -> None:
        # Reads the train-mode updates the kept calls refer to (`bnaudit.measure.updates.Ledger`):
        # the engine does after each pass, a flush in the middle of one does first.
        self.settle = settle
        self.calls: list[_Call] = []  # this pass's calls
        self.values = 0  # values of every copy kept: this pass's and the blocks'
        self.groups: dict[tuple[Any, ...], _Group] = {}
        # Per group, the passes kept for one kernel call, and their values.
        self.blocks: dict[tuple[Any, ...], _Block] = {}
        # Per regime, how its last pass's calls were grouped (`_Plan`): the next pass is
        # usually the same, and then joins the blocks without grouping its calls again.
        self.plans: dict[bool, _Plan] = {}

    @staticmethod
    def takes(x: Tensor) -> bool:
        return x.is_floating_point() and 0 < x.numel() <= SMALL_VALUES

    def add(self, probe: Probe, train: bool, x: Tensor, y: Tensor, update: Update | None) -> None:
        """One call of a layer: copies of its input and output, and the stats it left."""
        self.calls.append(_Call(probe, train, x, y, update))
        self.values += 2 * x.numel()
        if self.values > PENDING_VALUES:
            self.flush()

    def end_pass(self) -> None:
        """After a forward pass: its calls join their groups' blocks; full blocks are measured.

        A pass whose groups differ from the last pass of its regime (another batch shape, a
        layer that did not run) first has every kept block measured, so that each layer's calls
        are measured in the order they ran.
        """
        calls, self.calls = self.calls, []
        if not calls:
            return
        train = calls[0].train
        plan = self.plans.get(train)
        if plan is None or plan.signature != _signature(calls):
            plan = self._plan(calls)
            if self.plans.get(train, plan).keys() != plan.keys():
                self._measure_blocks()
            self.plans[train] = plan
        for key, (positions, values) in plan.groups.items():
            block = self.blocks.get(key)
            if block is None:
                block = self.blocks[key] = _Block()
            block.passes.append([calls[i] for i in positions])
            block.values += values
            if block.values > BLOCK_VALUES:
                self._measure_block(key)

    def flush(self) -> None:
        """Measure every kept call now: the blocks, then this pass's calls so far."""
        self.settle()
        calls, self.calls = self.calls, []
        self._measure_blocks()
        for key, same in self._by_group(calls).items():
            self.groups[key].measure([same])
        self.plans.clear()
        self.values = 0

    def finish(self) -> None:
        """Hand each layer its share of the groups' accumulators."""
        self.flush()
        for group in self.groups.values():
            group.rows.fold(group.stats)
            for probe, channels in zip(group.probes, group.slices, strict=True):
                probe.stats.merge(group.stats.channels(channels))
        self.groups.clear()

    def _by_group(self, calls: list[_Call]) -> dict[tuple[Any, ...], list[_Call]]:
        """One pass's calls by the group that measures them, in the order they ran."""
        by_kind: dict[_Kind, list[_Call]] = {}
        for call in calls:
            by_kind.setdefault(_kind(call), []).append(call)
        out = {}
        for kind, same in by_kind.items():
            key = (kind, tuple(id(c.probe) for c in same))
            if key not in self.groups:
                self.groups[key] = _Group([c.probe for c in same], kind)
            out[key] = same
        return out

    def _plan(self, calls: list[_Call]) -> _Plan:
        groups = {}
        positions = {id(c): i for i, c in enumerate(calls)}
        for key, same in self._by_group(calls).items():
            groups[key] = ([positions[id(c)] for c in same], sum(2 * c.x.numel() for c in same))
        return _Plan(_signature(calls), groups)

    def _measure_blocks(self) -> None:
        for key in list(self.blocks):
            self._measure_block(key)

    def _measure_block(self, key: tuple[Any, ...]) -> None:
        block = self.blocks.pop(key)
        self.values -= block.values
        self.groups[key].measure(block.passes)


def _signature(calls: list[_Call]) -> tuple[Any, ...]:
    """What decides one pass's groups, compared to reuse the last pass's."""
    return tuple((id(c.probe), c.x.shape, c.x.dtype, c.y.dtype, c.update is None) for c in calls)


@dataclass(frozen=True)
class _Plan:
    """One pass's calls grouped: per group, the calls' positions in the pass and their values."""

    signature: tuple[Any, ...]
    groups: dict[tuple[Any, ...], tuple[list[int], int]]

    def keys(self) -> tuple[tuple[Any, ...], ...]:
        return tuple(self.groups)


@dataclass
class _Block:
    """Consecutive passes' calls of one group, kept to be measured in one kernel call."""

    passes: list[list[_Call]] = field(default_factory=list)
    values: int = 0


class _Kind(NamedTuple):
    """What calls measured together share: regime, statistics, batch shape, dtypes, device.
    (A tuple: it is made and hashed for every call.)"""

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
        None if call.update is None else call.update.mean.dtype,
    )


def _uses_batch(a: LayerAttrs, train: bool) -> bool:
    """Whether the output normalises with the batch's statistics (else the running ones)."""
    return a.kind is not LayerKind.FROZEN and (train or not a.has_running_stats)


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
        self._repeated: dict[int, _Attributes] = {}  # per number of passes measured at once

    def measure(self, passes: list[list[_Call]]) -> None:
        """Measure consecutive passes' calls of these layers in one kernel call."""
        calls = [c for same in passes for c in same]
        x = torch.cat([c.x for c in calls], dim=1) if len(calls) > 1 else calls[0].x
        y = torch.cat([c.y for c in calls], dim=1) if len(calls) > 1 else calls[0].y
        k = len(passes)
        weight, bias, eps, running = self._attributes(k)
        got = fused.measure(x, y, weight, bias, eps, running, y.dtype)
        if not (got.finite and got.worst <= 1):
            # Rare: non-finite values, or a layer that misses the formula. Pass by pass, then
            # one layer at a time, gives the exact per-layer counts and diagnoses.
            if k > 1:
                for same in passes:
                    self.measure([same])
            else:
                for c in calls:
                    _alone(c)
            return
        update = None
        if self.update_dtype is not None:
            update = [t for same in passes for t in self._count_steps(same)]
        u = max(F.sum_roundoff(c.x) for c in calls)
        key = (self.train, F.values_per_channel(x), x.shape[0], u)
        rows = tuple(got.block.view(4, k, -1))  # per quantity, [k, C]: k calls
        self.rows.add(self.stats, key, rows, update)  # type: ignore[arg-type]

    def _attributes(self, k: int) -> _Attributes:
        """γ, β, ε and the running stats (None: batch statistics), repeated for k passes."""
        got = self._repeated.get(k)
        if got is None:
            running = None
            if not self.uses_batch:
                running = (self.running_mean.repeat(k), self.running_var.repeat(k))
            got = (self.weight.repeat(k), self.bias.repeat(k), self.eps.repeat(k), running)
            self._repeated[k] = got
        return got

    def _count_steps(self, calls: list[_Call]) -> list[Tensor]:
        """Count the steps where T did not become T + 1; the running stats the calls left,
        every layer's mean, then every variance."""
        updates = [c.update for c in calls]
        assert all(u is not None for u in updates)
        for c, expected in zip(calls, self.expected_t, strict=True):
            got = c.update.count if c.update is not None else None
            if expected is not None and got is not None and got != expected:
                c.probe.stats.update.count_errors += 1
        return [u.mean for u in updates if u is not None] + [
            u.var for u in updates if u is not None
        ]


def _alone(c: _Call) -> None:
    """One call measured by its own probe, in the regime it ran in: the diagnosis is kept per
    regime, and a block may be measured during a later pass."""
    probe = c.probe
    regime, probe.regime = probe.regime, "train" if c.train else "eval"
    try:
        probe.measure_batch(c.x, c.y, c.train, c.update)
    finally:
        probe.regime = regime
