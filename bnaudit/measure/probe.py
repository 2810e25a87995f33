"""The forward hook on one BN layer: it measures each call and undoes the train-mode update.

The passes (`bnaudit.measure.passes`) switch the probes between its eval-mode and train-mode passes;
each call's input and output are reduced to per-channel accumulators (`bnaudit.measure.statistics`)
by the fused measurement (`bnaudit.measure.fused`), with the general float64 path for non-finite
values or a mismatch, which the diagnosis (`bnaudit.measure.explain`) then explains. Small
activations of standard layers are handed to `bnaudit.measure.grouped` to be measured side by side
after the pass.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from bnaudit.core import formulas as F
from bnaudit.core.layers import LayerAttrs, LayerKind, act_tap
from bnaudit.measure import fused
from bnaudit.measure.explain import Case, Diagnosis
from bnaudit.measure.grouped import Deferred
from bnaudit.measure.rows import Key, Rows, UpdateCheck
from bnaudit.measure.statistics import LayerStats, RegimeStats
from bnaudit.measure.updates import Ledger, Update

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Tally:
    """What one layer's measured calls add up to, both regimes: the accumulators (`stats`, the
    `diagnosis` per regime, the non-finite counts) and the fused kernel's results not folded
    into them yet (`rows`, and those `waiting` for their train-mode update)."""

    rows: Rows
    stats: LayerStats = field(default_factory=LayerStats)
    diagnosis: dict[str, Diagnosis] = field(
        default_factory=lambda: {"train": Diagnosis(), "eval": Diagnosis()}
    )
    nonfinite_inputs: int = 0
    nonfinite_outputs: int = 0
    waiting: list[tuple[Key, Tensor, Update]] = field(default_factory=list)


class _InTally(Generic[T]):
    """A probe attribute kept in its `Tally`: the audit reads it, `bnaudit.distributed` replaces
    it with every rank's merged."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, probe: Probe, owner: type | None = None) -> T:
        return getattr(probe.tally, self.name)

    def __set__(self, probe: Probe, value: T) -> None:
        setattr(probe.tally, self.name, value)


class Probe:
    """Forward hook of one BN layer; `regime` is switched by the engine between passes.

    A probe that does not `measure` only has its train-mode update undone: every BN layer must
    start each batch from the checkpoint's statistics, audited or not. The updates are read and
    undone by the `ledger`, a pass at a time (`bnaudit.measure.updates`).

    Each measured call takes one of three routes, chosen in `_measure` and `measure_batch`:
    later, with the other small layers after the forward pass (a standard layer's small
    activations, handed to its `group`, `bnaudit.measure.grouped`); now by the `kernel`
    prepared for this layer, when it applies and every value is finite; else now by the general
    float64 path. All of them add to one place, the probe's `tally`.
    """

    stats: _InTally[LayerStats] = _InTally()
    diagnosis: _InTally[dict[str, Diagnosis]] = _InTally()
    nonfinite_inputs: _InTally[int] = _InTally()
    nonfinite_outputs: _InTally[int] = _InTally()

    def __init__(
        self,
        name: str,
        module: nn.Module,
        clock: itertools.count,
        ledger: Ledger,
        measure: bool = True,
        group: Deferred | None = None,
    ) -> None:
        self.name = name
        self.measure = measure
        self.clock = clock  # shared by all probes: orders layers by their first call
        self.first_call: int | None = None
        self.largest = 0  # values in the largest call measured
        self.module = module
        self.attrs = a = LayerAttrs.of(module)
        # Exact copies (original dtype) to undo each train-mode update.
        self.saved = {k: b.detach().clone() for k, b in module.named_buffers(recurse=False)}
        # The module's own buffer table: each train-mode call's update is read and undone there,
        # without a Module.__getattr__ per buffer and call (what getattr would find).
        self.buffer_table = module._buffers
        self.ledger = ledger
        self.holding = False  # the buffers hold a train-mode update the ledger has not undone
        self.regime = "eval"
        self.checks_update = a.kind is not LayerKind.FROZEN and a.has_running_stats
        # A BatchNormAct-style layer is measured at the input of its first child (`tap`): the
        # normalisation there, before dropout and the activation (`bnaudit.core.layers.act_tap`).
        found = act_tap(module)
        self.tap_name, self.tap = found if found is not None else ("", None)
        self._input: Tensor | None = None  # this call's input, while a tapped call runs
        self.tapped_calls = 0  # calls measured at the tap
        self.output_calls = 0  # calls of a tapped layer whose tap did not run (read at the output)
        check = None
        if self.checks_update:
            assert a.running_mean is not None and a.running_var is not None
            factor = F.update_factor(a.momentum, a.num_batches_tracked or 0)
            dtype = a.buffer_dtype or a.dtype
            check = UpdateCheck(a.running_mean, a.running_var, factor, a.eps, dtype)
        self.tally = Tally(Rows(a.num_features, check))
        running = (a.running_mean, a.running_var) if a.has_running_stats else None
        self.kernel = fused.Prepared(a.weight, a.bias, a.eps, running, a.num_features)  # type: ignore[arg-type]
        # The kernel's formula is batch (or frozen) BN.
        self.prepared = a.kind is not LayerKind.INSTANCE
        # Standard BN layers (their forward is torch's) whose finite outputs match the formula
        # on every healthy model: the ones worth measuring in groups.
        standard = a.kind is not LayerKind.INSTANCE and (
            not a.overrides_forward or self.tap is not None
        )
        self.group = group if standard else None

    def hooks(self) -> list[Any]:
        """Attach the probe (the input and output hooks, and a tapped layer's hook on its tap);
        the handles, to remove."""
        handles = [
            self.module.register_forward_pre_hook(self._enter),
            self.module.register_forward_hook(self),
        ]
        if self.tap is not None:
            handles.append(self.tap.register_forward_pre_hook(self._at_tap))
        return handles

    def _enter(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """Before a call: the layer's second in a train-mode pass starts from the checkpoint's
        statistics too, so the update of the first is read and undone now."""
        if self.holding:
            self.ledger.settle()
        if self.tap is not None:
            x = inputs[0] if inputs else None
            self._input = x.detach() if isinstance(x, Tensor) else None

    def _at_tap(self, tap: nn.Module, inputs: tuple[Any, ...]) -> None:
        """The tap's input is the normalised value: measured now, before an in-place
        activation overwrites it. Only once per call of the layer (a shared child, say)."""
        x, self._input = self._input, None
        if x is not None and self.measure and inputs:
            self.tapped_calls += 1
            self._measure(self.module, (x,), inputs[0])

    def finish(self) -> None:
        """Fold the kept results into `stats` (after the passes)."""
        self.tally.rows.fold(self.tally.stats)

    @property
    def measured_at(self) -> str:
        """Where the output was read: "" the layer's own output, else the tap's input."""
        return f"input of {self.tap_name}" if self.tapped_calls and not self.output_calls else ""

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        try:
            if self.first_call is None:
                self.first_call = next(self.clock)
            if self.tap is None:
                if self.measure:
                    self._measure(module, inputs, output)
            elif self._input is not None:  # the tap did not run in this call
                self._input = None
                self.output_calls += self.measure
                if self.measure:
                    self._measure(module, inputs, output)
        finally:
            if self.regime == "train" and not self.holding:  # not measured: only to undo
                self.ledger.hold(self, None)

    def _measure(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
            return
        x, y = inputs[0].detach(), output.detach()
        if x.dim() < 2 or y.shape != x.shape:
            return
        self.largest = max(self.largest, x.numel())
        train = self.regime == "train"
        update = None
        if train and self.checks_update:  # read by the ledger, after the pass as a rule
            update = Update()
            self.ledger.hold(self, update)
        group = self.group
        if group is not None and x.shape[1] == self.attrs.num_features and group.takes(x):
            # Later. Copies: the forward goes on and may change these tensors in place (a ReLU).
            group.add(self, train, x.clone(), y.clone(), update)
        else:
            self.measure_batch(x, y, train, update)

    def updated(self) -> None:
        """The ledger has read this probe's update: record the results that waited for it."""
        t = self.tally
        waiting, t.waiting = t.waiting, []
        for key, measured, update in waiting:
            self._record(key, measured, update)

    def _record(self, key: Key, measured: Tensor, update: Update | None) -> None:
        if update is not None:
            self._count_step(update)
        t = self.tally
        t.rows.add(t.stats, key, measured, None if update is None else [update.mean, update.var])

    def measure_batch(self, x: Tensor, y: Tensor, train: bool, update: Update | None) -> None:
        """Measure one call now: input `x`, output `y`, and the running stats it left (train);
        by the prepared kernel where its formula applies to a floating, non-empty input and it
        finds every value finite, else by the general path."""
        prepared = self.prepared and x.is_floating_point() and x.numel() != 0
        if not (prepared and self._measure_prepared(x, y, train, update)):
            self._measure_general(x, y, train, update)

    def _measure_prepared(self, x: Tensor, y: Tensor, train: bool, update: Update | None) -> bool:
        """The common case, without a float64 copy of the activations; False: not finite.

        Applies to a floating input of batch and frozen BN (`measure_batch` checks) when the
        input, the statistics and the errors are all finite, which is decided on the reductions
        it computes anyway (NaN and Inf survive a sum; a float64 sum of finite values of a
        float32 or narrower input cannot overflow). It then records exactly what
        `_measure_general` would; otherwise the caller goes there, and nothing has been recorded.
        """
        a = self.attrs
        uses_batch = a.kind is not LayerKind.FROZEN and (train or not a.has_running_stats)
        running = None if uses_batch else (a.running_mean, a.running_var)
        got = self.kernel.measure(x, y, running, y.dtype)  # type: ignore[arg-type]
        if not got.finite:
            return False
        n = F.values_per_channel(x)
        if not got.worst <= 1:  # this batch misses the formula: why?
            mean, var = got.mean, got.var
            ref_mean, ref_var = (mean, var) if running is None else running
            self._diagnose(
                x.double(), y.double(), ref_mean, ref_var, mean, var, n, uses_batch, y.dtype,
                F.sum_roundoff(x) if uses_batch else 0.0,
            )  # fmt: skip
        # Finite inputs and outputs: nothing to add to the non-finite counts.
        key = (train, n, x.shape[0], F.sum_roundoff(x))
        if update is not None and not update.ready:
            self.tally.waiting.append((key, got.block, update))
        else:
            self._record(key, got.block, update)
        return True

    def _measure_general(self, x: Tensor, y: Tensor, train: bool, update: Update | None) -> None:
        """Every layer kind, NaN and Inf included, on float64 copies of the activations."""
        if update is not None and not update.ready:  # rare: read it now
            self.ledger.settle()
        a = self.attrs
        x64, y64 = x.double(), y.double()
        batch_mean, batch_var = F.batch_stats(x64)
        # `stat_*` is what the running stats estimate; `ref_*` what this output normalised with.
        if a.kind is LayerKind.INSTANCE:
            inst_mean, inst_var = F.instance_stats(x64)
            n = x[0, 0].numel()
            stat_mean, stat_var = inst_mean.mean(0), inst_var.mean(0)
        else:
            inst_mean, inst_var = batch_mean, batch_var
            n = F.values_per_channel(x)
            stat_mean, stat_var = batch_mean, batch_var
        uses_batch = a.kind is not LayerKind.FROZEN and (train or not a.has_running_stats)
        ref_mean, ref_var = (inst_mean, inst_var) if uses_batch else (a.running_mean, a.running_var)
        # torch's own batch sums may carry rounding (channels-last); per-sample ones do not.
        u = F.sum_roundoff(x) if a.kind is not LayerKind.INSTANCE else 0.0
        rounding = F.stat_rounding(n, batch_mean, batch_var, u) if u else None
        t = self.tally
        regime = t.stats.train if train else t.stats.eval
        ratio = _record_error(
            regime, x64, y64, ref_mean, ref_var, a, y.dtype, rounding if uses_batch else None
        )
        if not bool((ratio <= 1).all()):  # this batch misses the formula (or is NaN): why?
            self._diagnose(
                x64, y64, ref_mean, ref_var, batch_mean, batch_var, n, uses_batch, y.dtype,
                u if uses_batch else 0.0,
            )  # fmt: skip
        regime.add_batch(
            n,
            x.shape[0],
            stat_mean,
            stat_var,
            pooled=(F.values_per_channel(x), batch_mean, batch_var),
        )
        bad_in = int((~torch.isfinite(x)).sum())
        t.nonfinite_inputs += bad_in
        if not bad_in:  # a NaN arriving from upstream is that layer's finding, not this one's
            t.nonfinite_outputs += int((~torch.isfinite(y)).sum())
        if update is not None:
            self.check_update(stat_mean, stat_var, n, update, rounding)

    def _diagnose(
        self,
        x64: Tensor,
        y64: Tensor,
        ref_mean: Tensor,
        ref_var: Tensor,
        batch_mean: Tensor,
        batch_var: Tensor,
        n: int,
        uses_batch: bool,
        dtype: torch.dtype,
        roundoff: float,
    ) -> None:
        """Record why this call missed the formula (the usual mistakes, tried in turn)."""
        a = self.attrs
        case = Case(
            x64, y64, ref_mean, ref_var, batch_mean, batch_var, a.running_mean, a.running_var,
            a.weight, a.bias, a.eps, n, uses_batch, dtype, roundoff,
        )  # fmt: skip
        self.tally.diagnosis[self.regime].add(case)

    def check_update(
        self,
        mean: Tensor,
        var: Tensor,
        n: int,
        update: Update,
        rounding: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Compare one running-stat update with (1 − m)·old + m·batch, and T with T + 1;
        `rounding`: how far torch's batch statistics may be off (`formulas.stat_rounding`)."""
        a = self.attrs
        assert a.running_mean is not None and a.running_var is not None  # checks_update
        t_before = a.num_batches_tracked or 0
        instance = a.kind is LayerKind.INSTANCE
        factor = F.update_factor(a.momentum, t_before, instance=instance)
        got_mean, got_var = update.mean, update.var
        self.tally.stats.update.add(
            *F.update_residuals(
                a.running_mean,
                a.running_var,
                mean,
                var,
                n,
                factor,
                got_mean.double(),
                got_var.double(),
                a.eps,
                got_mean.dtype,
                rounding,
            )
        )
        self._count_step(update)

    def _count_step(self, update: Update) -> None:
        """Count a train step where num_batches_tracked did not become T + 1 (InstanceNorm: T)."""
        a = self.attrs
        expected_t = (a.num_batches_tracked or 0) + (0 if a.kind is LayerKind.INSTANCE else 1)
        got_t = update.count
        if a.num_batches_tracked is not None and got_t is not None and got_t != expected_t:
            self.tally.stats.update.count_errors += 1


def _record_error(
    regime: RegimeStats,
    x: Tensor,
    y: Tensor,
    mean: Tensor,
    var: Tensor,
    a: LayerAttrs,
    dtype: torch.dtype,
    rounding: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """Record max |y − ref| and its ratio to the tolerance per channel; return the ratios."""
    ref = F.normalize(x, mean, var, a.weight, a.bias, a.eps)
    err = F.mismatch(y, ref)
    tol = F.elementwise_tolerance(x, ref, mean, var, a.weight, a.eps, dtype, rounding)
    dims = F.stat_dims(x)
    ratio = torch.where(err == 0, err, err / tol).amax(dim=dims)
    regime.err_abs.add(err.amax(dim=dims))
    regime.err_ratio.add(ratio)
    return ratio
