"""Cross-rank drift of BN statistics inside a training job.

DDP broadcasts rank 0's buffers every step by default, so the ranks agree; with
`broadcast_buffers=False`, or a precise-BN step that does not reduce across ranks, each rank's
running statistics follow its own batches and only rank 0's copy is saved. `compare_ranks`
gathers every BN layer's buffers from every rank and says per layer how far the ranks are apart,
which rank is the outlier, and how far rank 0's copy (what a checkpoint saved from rank 0
holds) is from the merged statistics.

The merged statistics are the mean over ranks of the running means and of the running
variances: each rank's EMA estimates the expected batch mean and unbiased batch variance on its
data, the same average precise BN takes over batches (`bnaudit.measure.impact`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnaudit.core.layers import find_bn_layers
from bnaudit.verdict.results import Finding, Severity

DRIFT = "rank-drift"
WRAPPER_PREFIX = "module."  # DDP, DataParallel


@dataclass(frozen=True)
class DriftLimits:
    """Beyond these the ranks disagree by more than EMA jitter on the same data explains."""

    shift: float = 0.1  # |μ_r − μ| in merged running sds
    log_var: float = 0.1  # |ln((σ²_r + ε) / (σ² + ε))|: 10 % in variance
    counter: int = 0  # num_batches_tracked spread (ranks that ran different step counts)


@dataclass(frozen=True)
class LayerDrift:
    """One BN layer across the ranks; the maxima are over ranks and channels."""

    name: str  # without the DDP `module.` prefix
    shift: float  # max |μ_r − μ| / sqrt(σ² + ε), μ and σ² merged over ranks
    log_var: float  # max |ln((σ²_r + ε) / (σ² + ε))|
    counter_spread: int  # max − min of num_batches_tracked (0 without a counter)
    outlier: int | None  # the rank farthest from the others' median (3 ranks or more)
    saved_shift: float  # rank 0's copy against the merged statistics
    saved_log_var: float
    findings: tuple[Finding, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.findings


@dataclass(frozen=True)
class RankDrift:
    """`compare_ranks`' result, the same on every rank; `bool()` is `passed`."""

    world: int
    layers: tuple[LayerDrift, ...]
    merged: dict[str, tuple[Tensor, Tensor]]  # layer → (running_mean, running_var)
    limits: DriftLimits = dataclasses.field(default_factory=DriftLimits)

    @property
    def findings(self) -> list[Finding]:
        return [f for layer in self.layers for f in layer.findings]

    @property
    def passed(self) -> bool:
        return not self.findings

    def __bool__(self) -> bool:
        return self.passed

    def layer(self, name: str) -> LayerDrift:
        return next(d for d in self.layers if d.name == name)


def compare_ranks(
    model: nn.Module, *, limits: DriftLimits | None = None, group: dist.ProcessGroup | None = None
) -> RankDrift:
    """Gather every BN layer's buffers from all ranks (one all-gather per buffer dtype, on
    the buffers' device) and measure how far the ranks drifted apart. Every rank of `group`
    must call it; the model is only read."""
    limits = limits or DriftLimits()
    world = dist.get_world_size(group)
    layers = [
        (_name(n), m)
        for n, m in find_bn_layers(model)
        if getattr(m, "running_mean", None) is not None
        and getattr(m, "running_var", None) is not None
    ]
    buffers: list[tuple[str, str, Tensor]] = []
    for name, m in layers:
        buffers += [(name, "running_mean", m.running_mean), (name, "running_var", m.running_var)]
        counter = getattr(m, "num_batches_tracked", None)
        if isinstance(counter, Tensor):
            buffers.append((name, "num_batches_tracked", counter))
    gathered = _gather_by_dtype(buffers, world, group)
    rows, merged = [], {}
    for name, m in layers:
        means = gathered[(name, "running_mean")].double()  # [world, C]
        variances = gathered[(name, "running_var")].double()
        counters = gathered.get((name, "num_batches_tracked"))
        row, mean, var = _layer_drift(means, variances, counters, float(m.eps))
        rows.append(row)
        merged[name] = (mean.to(m.running_mean.dtype), var.to(m.running_var.dtype))
    # One transfer to the host for every layer's numbers, not one per layer.
    values = torch.stack(rows).tolist() if rows else []
    results = []
    for (name, _), (shift, log_var, spread, outlier, saved_shift, saved_log_var) in zip(
        layers, values, strict=True
    ):
        d = LayerDrift(name, shift, log_var, int(spread), None, saved_shift, saved_log_var)
        findings = _judge(dataclasses.replace(d, outlier=_outlier(outlier, world)), limits)
        if findings:
            d = dataclasses.replace(d, outlier=_outlier(outlier, world), findings=findings)
        results.append(d)
    return RankDrift(world, tuple(results), merged, limits)


def _outlier(index: float, world: int) -> int | None:
    """With two ranks neither is the odd one out."""
    return int(index) if world >= 3 else None


def _gather_by_dtype(
    buffers: list[tuple[str, str, Tensor]], world: int, group: dist.ProcessGroup | None
) -> dict[tuple[str, str], Tensor]:
    """Every rank's copy of each buffer, [world, numel], with one collective per dtype."""
    out: dict[tuple[str, str], Tensor] = {}
    for dtype in dict.fromkeys(t.dtype for _, _, t in buffers):
        same = [(n, k, t) for n, k, t in buffers if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for _, _, t in same])
        everyone = flat.new_empty(world * flat.numel())  # gloo wants the concatenation
        _all_gather(everyone, flat, group=group)
        everyone = everyone.view(world, flat.numel())
        start = 0
        for name, key, t in same:
            out[(name, key)] = everyone[:, start : start + t.numel()]
            start += t.numel()
    return out


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _layer_drift(
    means: Tensor, variances: Tensor, counters: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(shift, log_var, counter spread, outlier, saved shift, saved log_var) as one float64
    tensor on the device, and the merged mean and variance."""
    mean, var = means.mean(0), variances.mean(0)
    shift = (means - mean).abs() / (var + eps).sqrt()  # [world, C]
    log_var = ((variances + eps) / (var + eps)).log().abs()
    zero = means.new_zeros(())
    spread = (counters.max() - counters.min()).double() if counters is not None else zero
    # The outlier is judged against the median of the ranks, so one drifted rank does not
    # drag the centre towards itself; by its counter when the statistics agree.
    centre_mean, centre_var = means.quantile(0.5, dim=0), variances.quantile(0.5, dim=0)
    far = torch.maximum(
        ((means - centre_mean).abs() / (centre_var + eps).sqrt()).amax(1),
        ((variances + eps) / (centre_var + eps)).log().abs().amax(1),
    )
    if counters is not None:
        steps = counters.double().reshape(-1)
        off_count = (steps - steps.quantile(0.5)).abs()
        far = torch.where(far.amax() > 0, far, off_count)
    row = torch.stack(
        [
            shift.amax(), log_var.amax(), spread, far.argmax().double(),
            shift[0].amax(), log_var[0].amax(),
        ]
    )  # fmt: skip
    return row, mean, var


def _judge(d: LayerDrift, limits: DriftLimits) -> tuple[Finding, ...]:
    off = []
    if not d.shift <= limits.shift:  # NaN counts as off
        off.append(f"running means differ by up to {d.shift:.3g} sds (limit {limits.shift:g})")
    if not d.log_var <= limits.log_var:
        off.append(f"|ln variance ratio| up to {d.log_var:.3g} (limit {limits.log_var:g})")
    if d.counter_spread > limits.counter:
        off.append(f"num_batches_tracked differs by {d.counter_spread} between ranks")
    if not off:
        return ()
    who = f"rank {d.outlier} is the outlier; " if d.outlier is not None else ""
    message = (
        f"the ranks' statistics disagree: {'; '.join(off)}; {who}rank 0's copy (the one a "
        f"checkpoint saved from rank 0 holds) is {d.saved_shift:.3g} sds and "
        f"{d.saved_log_var:.3g} in ln variance from the merged statistics"
    )
    hint = (
        "keep DDP's broadcast_buffers=True, use SyncBatchNorm, or reduce the statistics across "
        "ranks before saving (RankDrift.merged; bnaudit recalibrate under torchrun)"
    )
    value = max(d.shift, d.log_var)
    return (Finding(d.name, DRIFT, Severity.WARN, message, hint, value, limits.shift),)


def _name(name: str) -> str:
    return name.removeprefix(WRAPPER_PREFIX)


class DriftMonitor:
    """For a training loop: `monitor(model, step)` compares the ranks every `every` steps and
    hands a drift with findings to `on_drift` (default: keep it in `last`). Every rank must
    call it at the same steps."""

    def __init__(
        self,
        every: int,
        on_drift: Callable[[RankDrift, int], None] | None = None,
        limits: DriftLimits | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"DriftMonitor(every={every}): expected a step count of at least 1")
        self.every, self.on_drift, self.limits = every, on_drift, limits
        self.last: RankDrift | None = None

    def __call__(self, model: nn.Module, step: int) -> RankDrift | None:
        if step % self.every:
            return None
        self.last = drift = compare_ranks(model, limits=self.limits)
        if not drift.passed and self.on_drift is not None:
            self.on_drift(drift, step)
        return drift


def write_merged(model: nn.Module, drift: RankDrift) -> None:
    """Copy the merged statistics into `model`'s BN buffers (the caller's model, meant to
    change: on rank 0 before saving, say); `num_batches_tracked` is left as it is."""
    modules = {_name(n): m for n, m in find_bn_layers(model)}
    with torch.no_grad():
        for name, (mean, var) in drift.merged.items():
            modules[name].running_mean.copy_(mean)
            modules[name].running_var.copy_(var)
