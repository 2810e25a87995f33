"""Precise-BN statistics, and how much they change the model's output.

Precise statistics come from the audit's own train-mode pass, at no extra forward pass: per
layer, the mean over batches of the batch means and of the unbiased batch variances. That is
what a running average converges to on this data (what `stale-stats` compares against, and what
fvcore's and AIMET's precise BN compute), so a recalibrated checkpoint looks exactly like one
whose EMA settled on these batches. The true population variance would add the between-batch
variance of the means (pycls after its PR #93); it describes a batch size of "all the data",
which no train-mode forward ever normalised with.

`--regime eval` instead recalibrates from each layer's *eval-mode* input with the layers before
it already recalibrated: pass p fixes every layer p BN levels deep, so it takes (BN depth + 1)
passes over the batches, stopping as soon as no statistic changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bnaudit.core import formulas as F
from bnaudit.core.layers import LayerKind, layer_kind, preserved
from bnaudit.inputs.calls import call_model
from bnaudit.inputs.containers import tensors
from bnaudit.measure import fused
from bnaudit.measure.progress import Ticking
from bnaudit.measure.statistics import Moments

Stats = dict[str, tuple[Tensor, Tensor]]  # layer name → (running_mean, running_var)
InputMoments = dict[str, tuple[Moments, Moments]]  # layer name → (batch means, batch variances)
# Per-batch values (float64) a recalibration hook keeps before merging them: memory stays bounded.
KEPT_VALUES = 1 << 20


class Across(Protocol):
    """Merges what this process measured with what the other processes of a job measured
    (`bnaudit.distributed.Ranks`); every process gets the same merged values back."""

    def moments(self, moments: InputMoments) -> InputMoments: ...

    def diff(self, diff: OutputDiff, passes: int) -> tuple[OutputDiff, int]: ...

    def total(self, count: int) -> int: ...


TOP1 = "top-1 accuracy"
# the progress stages of its passes: "task metric, fit half 1", ...
# Two-sided 95 %: a difference is "beyond noise" when its interval excludes zero.
Z_95 = 1.96


@dataclass(frozen=True)
class Evidence:
    """The metric with the stored statistics and with cross-fitted recalibrated ones."""

    metric: str  # TOP1, or the --metric spec
    regime: str  # how the statistics were recalibrated (train or eval)
    batches: int
    samples: int
    stored: float
    recalibrated: float
    difference: float  # recalibrated − stored
    stderr: float  # of the difference
    forward_passes: int

    @property
    def worse(self) -> bool:
        """Recalibration lowers the metric beyond noise (written so that NaN counts as worse)."""
        return not self.difference + Z_95 * self.stderr >= 0

    @property
    def better(self) -> bool:
        return self.difference - Z_95 * self.stderr > 0

    def change(self) -> str:
        """The difference alone, e.g. "top-1 accuracy by 19.5 ± 3.7 pp (cross-fitted)"."""
        pct = self.metric == TOP1
        unit, scale = (" pp", 100.0) if pct else ("", 1.0)
        return (
            f"{self.metric} by {scale * abs(self.difference):.3g} ± "
            f"{scale * Z_95 * self.stderr:.2g}{unit} (cross-fitted)"
        )

    def describe(self) -> str:
        pct = self.metric == TOP1
        unit, scale = (" pp", 100.0) if pct else ("", 1.0)

        def fmt(v: float) -> str:
            return f"{100 * v:.1f}%" if pct else f"{v:.4g}"

        return (
            f"{self.metric} on {self.samples} labelled samples: stored stats {fmt(self.stored)}, "
            f"recalibrated (cross-fitted, {self.regime} regime) {fmt(self.recalibrated)}, "
            f"difference {scale * self.difference:+.3g} ± {scale * Z_95 * self.stderr:.2g}{unit} "
            "(95 %)"
        )


@dataclass(frozen=True)
class OutputImpact:
    """Eval-mode output with the stored statistics against the recalibrated ones."""

    regime: str  # "train" or "eval": how the statistics were recalibrated
    batches: int
    forward_passes: int  # what this measurement cost on top of the audit's own passes
    rel_l2: float  # ||y_recalibrated − y_stored|| / ||y_stored||
    max_abs: float
    top1_agreement: float | None  # for [B, K] class scores (K >= 2)
    per_layer: dict[str, float] = field(default_factory=dict)  # rel L2, one layer swapped
    evidence: Evidence | None = None  # the task metric, with labels (bnaudit.measure.evidence)
    # what top1_agreement assumes, shown beside it: "" when class labels showed the output
    # holds class scores
    top1_basis: str = ""
    # without labels, the output's own confidence, cross-fitted alike (bnaudit.verdict.staleness)
    confidence: Evidence | None = None


@dataclass
class OutputDiff:
    """Streaming comparison of two models' outputs, batch by batch."""

    sq_diff: float = 0.0
    sq_ref: float = 0.0
    max_abs: float = 0.0
    agree: int = 0
    rows: int = 0
    classes: bool = True  # every output was one [B, K] tensor, K >= 2 and the same K
    width: int = 0  # that K

    def add(self, ref: Any, new: Any) -> None:
        a, b = _floats(ref), _floats(new)
        self.classes &= len(a) == 1 and a[0].dim() == 2 and a[0].shape[1] >= 2
        if self.classes:
            self.classes = self.width in (0, a[0].shape[1])
            self.width = a[0].shape[1]
        for x, y in zip(a, b, strict=True):
            x, y = x.double(), y.double()
            self.sq_diff += float((y - x).square().sum())
            self.sq_ref += float(x.square().sum())
            self.max_abs = max(self.max_abs, float((y - x).abs().max()) if x.numel() else 0.0)
        if self.classes:
            self.agree += int((a[0].argmax(1) == b[0].argmax(1)).sum())
            self.rows += a[0].shape[0]

    @property
    def rel_l2(self) -> float:
        if self.sq_ref == 0:
            return 0.0 if self.sq_diff == 0 else math.inf
        return math.sqrt(self.sq_diff / self.sq_ref)

    @property
    def top1(self) -> float | None:
        return self.agree / self.rows if self.classes and self.rows else None


def _floats(out: Any) -> list[Tensor]:
    """The floating tensors of a model output (a tensor, or nested containers)."""
    return [t.detach() for t in tensors(out) if t.is_floating_point()]


@contextlib.contextmanager
def statistics(layers: dict[str, nn.Module], stats: Stats) -> Iterator[None]:
    """Run with these running statistics in place of the stored ones, restored on exit."""
    saved = {n: (layers[n].running_mean.clone(), layers[n].running_var.clone()) for n in stats}
    try:
        with torch.no_grad():
            for name, (mean, var) in stats.items():
                layers[name].running_mean.copy_(mean)
                layers[name].running_var.copy_(var)
        yield
    finally:
        with torch.no_grad():
            for name, (mean, var) in saved.items():
                layers[name].running_mean.copy_(mean)
                layers[name].running_var.copy_(var)


def stored_output(model: nn.Module, batch: Any, index: int, stored: list[Any] | None):
    """The eval output of batch `index` with the stored statistics, and the passes it cost:
    the audit's own, when it kept it (0), else one forward (1)."""
    if stored is not None and index < len(stored):
        return stored[index], 0
    return call_model(model, batch), 1


def compare_outputs(
    model: nn.Module,
    batches: Iterable[Any],
    layers: dict[str, nn.Module],
    stats: Stats,
    stored: list[Any] | None,
) -> tuple[OutputDiff, int]:
    """Eval outputs with `stats` swapped in against the stored-stat ones; (diff, passes)."""
    diff, passes = OutputDiff(), 0
    model.eval()
    # The statistics stay swapped in while the reference outputs are the stored ones: a swap
    # per batch costs more than a tiny batch's forward.
    with contextlib.ExitStack() as swapped:
        for i, batch in enumerate(batches):
            if stored is None or i >= len(stored):
                swapped.close()  # this reference is a forward with the stored statistics
            ref, used = stored_output(model, batch, i, stored)
            passes += used
            if used or i == 0:
                swapped.enter_context(statistics(layers, stats))
            new = call_model(model, batch)
            passes += 1
            diff.add(ref, new)
    return diff, passes


def eval_regime_stats(
    model: nn.Module,
    batches: Iterable[Any],
    layers: dict[str, nn.Module],
    start: Stats,
    max_passes: int,
    across: Across | None = None,
) -> tuple[Stats, int]:
    """Recalibrate from eval-mode inputs, level by level, until nothing changes.

    Returns the statistics and the number of passes over the batches it took. With `across`,
    each level's moments are merged over the job's processes before the next level.
    """
    current = dict(start)
    for done in range(1, max_passes + 1):
        with statistics(layers, current):
            model.eval()
            moments, _ = _input_moments(model, batches, layers, list(current))
        if across is not None:
            moments = across.moments(moments)
        new = _as_stats(moments, layers)
        # Settled layers recompute the same values (up to reduction order on a GPU).
        changed = any(
            not (_close(new[n][0], current[n][0]) and _close(new[n][1], current[n][1])) for n in new
        )
        current.update(new)
        if not changed:
            return current, done
    return current, max_passes


def like_buffer(t: Tensor, buffer: Tensor) -> Tensor:
    """`t` on the device and in the dtype of the running-stat buffer it will replace."""
    return t.to(device=buffer.device, dtype=buffer.dtype)


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(torch.allclose(a.double(), b.double(), rtol=1e-6, atol=0.0))


def precise_stats(
    model: nn.Module,
    calls: Iterable[Any],
    layers: dict[str, nn.Module],
    names: Sequence[str],
    regime: str,
    train_mode: str = "bn",
    across: Across | None = None,
) -> tuple[Stats, int]:
    """Precise statistics of `names` on these batches, and the passes it took: train regime,
    one train-mode pass (only the BN layers in train mode, or the whole model with
    `train_mode="all"`; statistics only), which may stream the batches; eval regime, the
    level-by-level eval passes of `impact.eval_regime_stats` over a list of them. The model is
    left as it was. With `across`, the moments are merged over the job's processes."""
    bn = list(layers.items())
    if regime == "eval":
        # Level by level from the stored statistics: pass p settles the layers p BN deep,
        # whatever they started from.
        start = {n: (layers[n].running_mean.clone(), layers[n].running_var.clone()) for n in names}
        if not isinstance(calls, Ticking):  # a Ticking replays its list, ticking every pass
            calls = list(calls)
        with preserved(model, bn), torch.no_grad():
            stats, levels = eval_regime_stats(model, calls, layers, start, len(start) + 1, across)
        return stats, levels * len(calls)
    with preserved(model, bn), torch.no_grad():
        if train_mode == "all":
            model.train()
        else:
            model.eval()
            for _, m in bn:
                m.training = True  # as the audit's train-mode pass: dropout and friends stay off
        moments, count = _input_moments(model, calls, layers, names)
    if across is not None:
        moments = across.moments(moments)
    return _as_stats(moments, layers), count


def _input_moments(
    model: nn.Module, calls: Iterable[Any], layers: dict[str, nn.Module], names: Sequence[str]
) -> tuple[InputMoments, int]:
    """One pass over the batches, in the model's current mode, measuring what the inputs of
    `names` would teach their running statistics (`_InputMoments`); (moments, batches run)."""
    moments = {n: (Moments(), Moments()) for n in names}
    hooks = [_InputMoments(layers[n], *moments[n]) for n in names]
    handles = [layers[n].register_forward_pre_hook(h) for n, h in zip(names, hooks, strict=True)]
    count = 0
    try:
        for c in calls:
            call_model(model, c)
            count += 1
    finally:
        for h in handles:
            h.remove()
    for hook in hooks:
        hook.fold()
    return moments, count


def _as_stats(moments: InputMoments, layers: dict[str, nn.Module]) -> Stats:
    """Running statistics from measured moments, in the buffers' device and dtype; a layer
    that saw no input (or only single-value batches) is left out."""
    return {
        n: (like_buffer(m.mean, layers[n].running_mean), like_buffer(v.mean, layers[n].running_var))
        for n, (m, v) in moments.items()
        if m.mean is not None and v.mean is not None
    }


class _InputMoments:
    """A pre-hook adding what the layer's running statistics estimate from one input: the
    batch mean and unbiased variance (per-sample ones, averaged, for InstanceNorm).

    The per-batch values are kept and merged K at a time (`Moments.add_values`, as the audit's
    rows): a merge per call costs more than a small layer's moments. `fold` merges the rest.
    """

    def __init__(self, module: nn.Module, means: Moments, variances: Moments) -> None:
        self.instance = layer_kind(module) is LayerKind.INSTANCE
        self.means, self.variances = means, variances
        # One read of x, no float64 copy: what update_bn's pass costs.
        channels = getattr(module, "num_features", 0)
        self.kernel = fused.Prepared(None, None, 0.0, None, channels)
        self.kept: list[Tensor] = []  # batch means
        self.kept_vars: list[Tensor] = []  # biased batch variances, with N > 1
        self.bessel: list[float] = []  # their N/(N − 1)

    def __call__(self, _: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach()
        if self.instance:
            mean, var = F.instance_stats(x.double())
            n = x[0, 0].numel()
            mean, var = mean.mean(0), var.mean(0)
        else:
            mean, var = (
                self.kernel.moments(x) if x.is_floating_point() else F.batch_stats(x.double())
            )
            n = F.values_per_channel(x)
        self.kept.append(mean)
        if n > 1:
            self.kept_vars.append(var)
            self.bessel.append(F.bessel(n))
        if len(self.kept) * mean.numel() >= KEPT_VALUES:
            self.fold()

    def fold(self) -> None:
        """Merge the kept values into the accumulators."""
        if self.kept:
            self.means.add_values(torch.stack(self.kept))
        if self.kept_vars:
            vars_ = torch.stack(self.kept_vars)
            factors = torch.tensor(self.bessel, dtype=vars_.dtype, device=vars_.device)
            self.variances.add_values(vars_ * factors[:, None])
        self.kept, self.kept_vars, self.bessel = [], [], []
