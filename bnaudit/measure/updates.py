"""The running stats each train-mode call leaves: read and put back a pass at a time.

Every BN layer must start each call from the checkpoint's statistics, and each train-mode call's
update is compared with the formula (`bnaudit.measure.rows`). Reading the update and putting the
checkpoint's statistics back in every layer's own hook is five small tensor operations per call,
about 20 µs in the middle of a forward pass: more than measuring a small layer. A train-mode
output normalises with the batch's statistics, so a layer's running stats are not read again
until its next call. The hooks therefore only note which layers hold an update (`Ledger.hold`);
the ledger copies the updates of all of them out in one operation per dtype, and the
checkpoint's statistics back in one, after the pass, before a layer's second call in the same
pass, or when a measurement needs an update at once (`Ledger.settle`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from bnaudit.core.layers import read_counter


class Probe(Protocol):
    """What the ledger needs of a layer's probe (`bnaudit.measure.probe.Probe`)."""

    holding: bool  # the buffers hold a train-mode update the ledger has not undone
    buffer_table: dict[str, Tensor | None]  # the module's own `_buffers`
    saved: dict[str, Tensor]  # the buffers as they were before the audit

    def updated(self) -> None: ...


class Update:
    """The running mean and variance one train-mode call left, and num_batches_tracked (None:
    no count to compare); `ready` once the ledger has read them."""

    __slots__ = ("count", "mean", "ready", "var")

    def __init__(self) -> None:
        self.mean: Tensor
        self.var: Tensor
        self.count: int | None = None
        self.ready = False


class Ledger:
    """The probes whose layers hold a train-mode update not read and not undone yet."""

    def __init__(self) -> None:
        self.held: list[tuple[Probe, Update | None]] = []

    def hold(self, probe: Probe, update: Update | None) -> None:
        """After a train-mode call: `probe`'s buffers hold its update (to read into `update`,
        None: only to undo)."""
        probe.holding = True
        self.held.append((probe, update))

    def settle(self) -> None:
        """Read every held update, put the checkpoint's statistics back, then let each probe
        record what waited for its update."""
        held, self.held = self.held, []
        if not held:
            return
        _read([(p, u) for p, u in held if u is not None])
        live: list[Tensor] = []
        saved: list[Tensor] = []
        for probe, _ in held:
            probe.holding = False
            buffers = probe.buffer_table
            for key, value in probe.saved.items():
                live.append(buffers[key])
                saved.append(value)
        _copy(live, saved)
        for probe, update in held:
            if update is not None:
                probe.updated()


def _read(held: list[tuple[Probe, Update]]) -> None:
    """Copy each layer's running mean and variance out: one concatenation per dtype and
    device, viewed back per layer; the counters as Python ints."""
    if not held:
        return
    by_kind: dict[tuple[torch.dtype, torch.device], list[tuple[Probe, Update]]] = {}
    for probe, update in held:
        mean = probe.buffer_table["running_mean"]
        by_kind.setdefault((mean.dtype, mean.device), []).append((probe, update))
    for same in by_kind.values():
        means = [p.buffer_table["running_mean"] for p, _ in same]
        variances = [p.buffer_table["running_var"] for p, _ in same]
        sizes = [m.numel() for m in means]
        parts = torch.cat(means + variances).split(sizes + sizes)
        for i, (_, update) in enumerate(same):
            update.mean, update.var = parts[i], parts[len(same) + i]
    counters = [p.buffer_table.get("num_batches_tracked") for p, _ in held]
    first = counters[0]
    if first is not None and all(_usual(c, first.device) for c in counters):
        counts = [t if t >= 0 else None for t in torch.stack(counters).tolist()]  # type: ignore[arg-type]
    else:
        counts = [_count(c) for c in counters]
    for (_, update), count in zip(held, counts, strict=True):
        update.count = count
        update.ready = True


def _usual(c: Tensor | None, device: torch.device) -> bool:
    """torch's own counter: one int64 number (0-dim), all on one device, to stack."""
    return c is not None and c.dtype is torch.int64 and c.dim() == 0 and c.device == device


def _count(c: Tensor | None) -> int | None:
    """read_counter's answer; the usual int64 counter without its checks. A float counter (a
    module converted with .type()) may hold NaN: no count to compare."""
    if c is not None and c.dtype is torch.int64 and c.numel() == 1:
        t = int(c.item())
        return t if t >= 0 else None
    return read_counter(c)[0]


# One call for every pair (torch ≥ 2.1); else a loop.
_FOREACH: Callable[[list[Tensor], list[Tensor]], None] | None = getattr(
    torch, "_foreach_copy_", None
)


def _copy(live: list[Tensor], saved: list[Tensor]) -> None:
    """live[i].copy_(saved[i]) for every i, in one call where torch has it (the passes run
    under no_grad; the buffers are not leaves of any graph)."""
    if _FOREACH is not None and live:
        _FOREACH(live, saved)
        return
    for dst, src in zip(live, saved, strict=True):
        dst.copy_(src)
