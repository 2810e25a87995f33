"""The audit's forward passes: every batch once in eval and once in train mode, a probe on
every BN layer, the model's state put back afterwards."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bnaudit.core.errors import DataError, NothingToAudit, describe
from bnaudit.core.layers import LayerKind, find_bn_layers, preserved
from bnaudit.core.runtime import torch_threads
from bnaudit.inputs.calls import Call, InputChoice, call_model, move_batch, to_call
from bnaudit.inputs.containers import map_tensors, tensors
from bnaudit.measure.fold import FoldWatch
from bnaudit.measure.grouped import Deferred
from bnaudit.measure.impact import Across, eval_regime_stats, like_buffer
from bnaudit.measure.probe import Probe
from bnaudit.measure.updates import Ledger


class PassOptions(Protocol):
    """What the passes read of the audit's options (`bnaudit.check.AuditOptions`)."""

    train_mode: str  # "bn": only BN layers in train mode; "all": the whole model
    max_batches: int | None
    layers: tuple[str, ...] | None  # audit only these (qualified names); None: all
    impact: bool  # keep the eval outputs and batches for the impact passes
    regime: str  # "train" or "eval": which statistics a recalibration would use
    output_budget_mb: float  # eval outputs kept for reuse; beyond, they are recomputed
    input: InputChoice  # which element or key of a batch is the input


@dataclass
class Passes:
    """What the audit's own forward passes left behind."""

    probes: list[Probe]
    layers: dict[str, nn.Module]  # every BN-like layer, audited or not
    count: int  # batches run
    batches: Iterable[Any]  # to run again for the output impact (moved to the device)
    outputs: list[Any] | None  # eval-mode outputs with the stored stats; None past the budget
    feed: str = ""  # how the batches feed the model, when they hold more than the input
    order: tuple[str, ...] = ()  # every BN layer that ran, audited or not, in the order it ran
    small: bool = False  # every call small: the passes after the first ran on one torch thread


# Below this many values in every BN call (torch's grain size: its element-wise ops on such a
# tensor run on one thread anyway), the passes after the first run on one torch thread. A
# parallel region then costs more than its work, and on a busy machine every region waits for
# all its threads to be scheduled: the 400-layer MLP's batch_norm and linear calls took 40×
# longer between the audit's hooks than back to back (issue 25).
SMALL_CALL_VALUES = 1 << 15


def small_calls(model: nn.Module, probes: list[Probe]) -> bool:
    """Whether the passes so far (at least one) saw only small BN calls, on the CPU."""
    largest = max((p.largest for p in probes), default=0)
    on_cpu = _model_device_dtype(model)[0].type == "cpu"
    return on_cpu and 0 < largest < SMALL_CALL_VALUES


def _set_regime(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    probes: list[Probe],
    regime: str,
    train_mode: str,
    first: bool,
) -> None:
    for p in probes:
        p.regime = regime
    if regime == "train":
        _set_train_mode(model, layers, train_mode)
    elif train_mode == "all" or first:
        model.eval()
    else:  # only the BN layers left eval mode: a walk of the model costs more
        for _, m in layers:
            m.training = False


def _set_train_mode(model: nn.Module, layers: list[tuple[str, nn.Module]], mode: str) -> None:
    if mode == "all":
        model.train()
    else:  # after the eval-mode pass: the model is in eval mode already
        for _, m in layers:
            # Not m.train(): a BN subclass's own children (timm's dropout in BatchNormAct2d)
            # stay in eval mode, so the pass stays deterministic.
            m.training = True


def run_passes(
    model: nn.Module,
    batches: Iterable[Any],
    options: PassOptions,
    progress: Callable[[int], None] | None = None,
    folds: FoldWatch | None = None,
) -> Passes:
    """Run every batch once in eval and once in train mode with all probes attached.

    `progress`, when given, is called with the number of batches done after each batch;
    `folds` watches the first eval-mode pass.
    """
    layers = find_bn_layers(model)
    if not layers:
        raise NothingToAudit(
            "the model has no BatchNorm layer (no torch.nn.modules.batchnorm._BatchNorm)"
        )
    clock = itertools.count()
    wanted = options.layers
    ledger = Ledger()
    deferred = Deferred(ledger.settle)
    probes = [
        Probe(name, m, clock, ledger, wanted is None or name in wanted, deferred)
        for name, m in layers
    ]
    device, dtype = _model_device_dtype(model)
    # Batches that may not come back in the same order (a one-shot iterator, a shuffling
    # DataLoader) are kept for the impact passes, which pair each batch with its eval output.
    keep = (options.impact or options.regime == "eval") and not _replayable(batches)
    feed = ""
    kept: list[Any] = []
    outputs: list[Any] | None = [] if options.impact else None
    budget = options.output_budget_mb * 2**20
    count = 0
    small = False
    with preserved(model, layers), torch.no_grad(), contextlib.ExitStack() as threads:
        handles = [h for p in probes for h in p.hooks()]
        try:
            for batch in batches:
                if options.max_batches is not None and count >= options.max_batches:
                    break
                batch = _as_call(model, move_batch(batch, device, dtype), options.input)
                feed = feed or batch.how
                for regime in ("eval", "train"):
                    _set_regime(model, layers, probes, regime, options.train_mode, count == 0)
                    watch = folds is not None and count == 0 and regime == "eval"
                    with folds.watching() if watch else contextlib.nullcontext():  # type: ignore[union-attr]
                        out = _forward(model, batch, count, regime)
                    ledger.settle()  # the train-mode updates, read and undone
                    deferred.end_pass()
                    if count == 0 and regime == "eval" and small_calls(model, probes):
                        small = True
                        threads.enter_context(torch_threads(1))
                    if regime == "eval" and outputs is not None:
                        outputs.append(_detached(out))
                        budget -= _nbytes(out)
                        if budget < 0:  # too big to keep: the impact passes recompute them
                            outputs = None
                if keep:
                    kept.append(batch)
                count += 1
                if progress is not None:
                    progress(count)
            deferred.finish()
            for p in probes:
                p.finish()
        finally:
            for h in handles:
                h.remove()
    again = kept if keep else Moved(model, batches, count, options.input)
    ran = sorted((p for p in probes if p.first_call is not None), key=lambda p: p.first_call or 0)
    order = tuple(p.name for p in ran)
    probed = [p for p in probes if p.measure]
    return Passes(probed, dict(layers), count, again, outputs, feed, order, small)


def _as_call(model: nn.Module, batch: Any, choice: InputChoice) -> Call:
    return batch if isinstance(batch, Call) else to_call(model, batch, choice)


def _replayable(batches: Iterable[Any]) -> bool:
    """Whether iterating `batches` again gives the same batches in the same order: not a
    one-shot iterator, nor a DataLoader that samples anew each time (shuffle=True). Any other
    iterable is taken to replay, as a dataset-backed loader does."""
    if isinstance(batches, Iterator):
        return False
    from torch.utils.data import DataLoader, SequentialSampler

    if isinstance(batches, DataLoader):
        return isinstance(batches.sampler, SequentialSampler)
    return True


class Moved:
    """Iterate `batches` again: the first `count`, each moved to the model's device and dtype."""

    def __init__(
        self, model: nn.Module, batches: Iterable[Any], count: int, choice: InputChoice
    ) -> None:
        self.model, self.batches, self.count, self.choice = model, batches, count, choice
        self.device, self.dtype = _model_device_dtype(model)

    def __iter__(self) -> Iterator[Call]:
        for batch in itertools.islice(self.batches, self.count):
            yield _as_call(self.model, move_batch(batch, self.device, self.dtype), self.choice)


def _detached(out: Any) -> Any:
    return map_tensors(Tensor.detach, out)


def _nbytes(out: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(out))


def _forward(model: nn.Module, batch: Any, index: int, regime: str) -> Any:
    try:
        return call_model(model, batch)
    # AssertionError: forwards check their input shapes with assert (timm's patch embedding).
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        hint = ""
        if "more than 1 value per channel" in str(exc):
            hint = (
                " A BN layer saw a single value per channel in train mode: use batches of at"
                " least 2 samples (--batch-size)."
            )
        raise DataError(
            f"the model's forward failed on batch {index} in {regime} mode: {describe(exc)}.{hint}"
        ) from exc


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    # Lazily: the first floating-point tensor decides, without listing a large model's.
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def recalibrated_stats(
    passes: Passes, regime: str, model: nn.Module, across: Across | None = None
) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
    """Precise statistics per recalibrable layer (see bnaudit.measure.impact for the choice)."""
    train = {
        p.name: (
            like_buffer(p.stats.train.batch_means.mean, p.module.running_mean),
            like_buffer(p.stats.train.batch_vars.mean, p.module.running_var),
        )
        for p in passes.probes
        if p.attrs.kind is not LayerKind.FROZEN
        and p.attrs.has_running_stats
        and p.stats.train.batch_means.mean is not None
        and p.stats.train.batch_vars.mean is not None
    }
    if regime == "train":
        return train, 0
    start = {
        n: (passes.layers[n].running_mean.clone(), passes.layers[n].running_var.clone())
        for n in train
    }
    # Every level needs one pass; the +1 confirms nothing moves any more.
    return eval_regime_stats(model, passes.batches, passes.layers, start, len(start) + 1, across)
