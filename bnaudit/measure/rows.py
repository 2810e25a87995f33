"""Per-channel results of many BN calls, kept and folded into the accumulators K at a time.

The fused measurement of one call is a handful of [C] vectors (batch mean and variance, maximum
error and ratio, the running stats the call left). Folding each into the streaming accumulators of
`bnaudit.measure.statistics` takes a few dozen small tensor operations, which on small layers and
tiny batches costs more than the measurement itself. So the rows are kept, bounded, and folded a
block at a time (`RegimeStats.add_batches`): the same statistics as one call at a time, up to
float64 rounding, for a few operations per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bnaudit.core import formulas as F
from bnaudit.measure.statistics import LayerStats

# Row values (float64) kept before they are folded: memory stays bounded however many batches.
RESULT_VALUES = 1 << 20


Key = tuple[bool, int, int, float]


@dataclass(frozen=True)
class UpdateCheck:
    """What a train-mode call's running stats are compared with: the checkpoint's (float64),
    the weight of the new batch, ε (per channel or one number) and the buffers' dtype."""

    running_mean: Tensor
    running_var: Tensor
    factor: Tensor | float
    eps: Tensor | float
    dtype: torch.dtype


class Rows:
    """The kept rows of one layer (or one group of layers side by side, `channels` wide)."""

    def __init__(self, channels: int, check: UpdateCheck | None) -> None:
        self.channels = channels
        self.check = check
        # (train, N, batch, u) → the rows of calls of that kind, and per row the running means,
        # then the variances, that the call left (when the update is checked); u is the unit
        # roundoff of torch's in-order batch sums (`formulas.sum_roundoff`), 0.0 for none
        self.kept: dict[Key, tuple[list[tuple[Tensor, ...]], list[Tensor]]] = {}
        self.count = 0

    def add(
        self,
        stats: LayerStats,
        key: Key,
        measured: tuple[Tensor, Tensor, Tensor, Tensor] | Tensor,
        update: list[Tensor] | None,
    ) -> None:
        """One call: `key` (train-mode pass, N values per channel, batch size, u); `measured`:
        batch mean, biased var, max err, max ratio, as four [C] tensors or one [4, C] (the
        kernel's result as it is: split at the fold, not in the hook); `update`: the running
        means and variances it left (train mode with a checked update), each layer's, means
        first. `measured` of [K, C] tensors is K calls (consecutive passes of a group), and
        `update` then theirs, call after call."""
        rows, updates = self.kept.setdefault(key, ([], []))
        if isinstance(measured, Tensor):  # one call's block, split at the fold
            rows.append(measured)  # type: ignore[arg-type]
            self.count += 1
        elif measured[0].dim() == 2:
            rows.extend(zip(*(t.unbind(0) for t in measured), strict=True))
            self.count += measured[0].shape[0]
        else:
            rows.append(measured)
            self.count += 1
        if update is not None:
            updates += update
        if self.count * self.channels * 6 > RESULT_VALUES:
            self.fold(stats)

    def fold(self, stats: LayerStats) -> None:
        """Fold the kept rows into `stats`."""
        kept, self.kept, self.count = self.kept, {}, 0
        for (train, n, batch, u), (rows, updates) in kept.items():
            mean, var, err, ratio = (torch.stack(column) for column in zip(*rows, strict=True))
            regime = stats.train if train else stats.eval
            regime.err_abs.add(err.amax(0))
            regime.err_ratio.add(ratio.amax(0))
            regime.add_batches(n, batch, mean, var)
            c = self.check
            if not updates or c is None:
                continue
            got = torch.cat(updates).view(len(rows), 2, self.channels).double()
            rounding = F.stat_rounding(n, mean, var, u) if u else None
            residuals = F.update_residuals(
                c.running_mean, c.running_var, mean, var, n, c.factor, got[:, 0], got[:, 1],
                c.eps, c.dtype, rounding,
            )  # fmt: skip
            stats.update.add(*(r.amax(0) for r in residuals))
