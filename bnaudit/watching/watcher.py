"""`bnaudit.watch`: every BN layer checked at every optimizer step of a training loop.

    with bnaudit.watch(model, optimizer) as w:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    print(w.report().render())

A step ends where `optimizer.step()` returns (a post-hook torch offers, so Lightning's closure,
which runs the forward inside `step`, belongs to its own step). What a step should do to a
layer is one update per call site and forward micro-batch. `accumulate=k` declares k
micro-batches, otherwise the watcher counts the backward passes since the last step (hooks on
the parameters' gradient accumulation). A layer's call sites are its train-mode calls within one
forward of the model (hooks on the model's own forward, `bnaudit.watching.forwards`): a BN
module shared by two convs has two, while a recomputation in backward or a second forward
adds updates beyond them. Nothing of the model or the optimizer is changed; `close()` removes
every hook.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from bnaudit.core.layers import find_bn_layers
from bnaudit.core.untrusted import plain
from bnaudit.distributed.drift import compare_ranks
from bnaudit.verdict.codes import WATCH_HINTS
from bnaudit.verdict.results import FailOn
from bnaudit.watching.forwards import Forwards
from bnaudit.watching.ledger import LayerAccount, drift_event
from bnaudit.watching.probes import Probe, read_calls
from bnaudit.watching.report import WatchReport
from bnaudit.watching.steps import Event, StepLayer, judge_step

WRAPPER_PREFIX = "module."  # DDP, DataParallel


class BadTrainingStep(RuntimeError):
    """`strict=True`: a watched step made a finding; the message names the step, the layer and
    the cause. The watcher is closed before it is raised."""

    def __init__(self, step: int, layer: str, event: Event, hint: str) -> None:
        super().__init__(
            f"bnaudit.watch: optimizer step {step}: BN layer {plain(layer)}: {event.code}: "
            f"{event.message}; fix: {hint}"
        )
        self.step, self.layer, self.code = step, layer, event.code


class Watcher:
    """The hooks of one watched training loop; see `watch`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        accumulate: int | None = None,
        every: int = 1,
        strict: bool = False,
        fail_on: FailOn | str = FailOn.WARN,
    ) -> None:
        for what, value in (("accumulate", accumulate), ("every", every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"bnaudit.watch({what}={value!r}): expected a whole number")
            if value is not None and value < 1:
                raise ValueError(f"bnaudit.watch({what}={value}): expected at least 1")
        if not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(
                f"bnaudit.watch: {type(optimizer).__name__} is not a torch.optim.Optimizer "
                "(no register_step_post_hook); pass the optimizer a wrapper holds"
            )
        self.model, self.optimizer = model, optimizer
        self.accumulate, self.every, self.strict = accumulate, every, strict
        self.fail_on = FailOn(fail_on)
        self.steps = self.watched = 0
        self.closed = False
        layers = [(n, m) for n, m in find_bn_layers(model) if _watchable(m)]
        skipped = len(find_bn_layers(model)) - len(layers)
        self.forwards = Forwards(model)
        self.probes = [Probe(n.removeprefix(WRAPPER_PREFIX), m, self.forwards) for n, m in layers]
        self.accounts = [LayerAccount(p.name, type(p.module).__name__) for p in self.probes]
        self.notes: list[str] = []
        if skipped:
            self.notes.append(
                f"{skipped} normalisation layer(s) without running statistics to update "
                "(track_running_stats=False, FrozenBatchNorm, InstanceNorm) were not watched"
            )
        self.world = _world()
        self._drift = self._drift_checked()
        self._grads: dict[int, int] = {}
        self._grad_handles: dict[int, Any] = {}
        self._hook_gradients()
        self._step_handle = optimizer.register_step_post_hook(self._after_step)
        self._set(True)  # step 1 is watched

    # -- hooks ---------------------------------------------------------------------------------

    def _set(self, on: bool) -> None:
        self._on = self.forwards.on = on
        for p in self.probes:
            p.on = on

    def _hook_gradients(self) -> None:
        """A counter on every trainable parameter: a backward pass that reaches it adds one.
        Parameters that become trainable later are hooked at the next watched step."""
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in self._grad_handles:
                self._grad_handles[id(p)] = p.register_post_accumulate_grad_hook(
                    self._counter(id(p))
                )

    def _counter(self, key: int) -> Any:
        def count(_: torch.Tensor) -> None:
            if self._on:
                self._grads[key] = self._grads.get(key, 0) + 1

        return count

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self._on:
            self._close_step(self.steps)
        self._set((self.steps % self.every) == 0)  # steps 1, 1 + every, ... are watched

    # -- one step ------------------------------------------------------------------------------

    def _close_step(self, step: int) -> None:
        self.watched += 1
        taken = [p.take() for p in self.probes]
        calls = read_calls(self.probes, [t.rows for t in taken])
        forwards = self.forwards.take()
        backwards = max(self._grads.values(), default=0)
        micro, declared = self._micro_batches(backwards)
        ran = backwards > 0 or any(t.train_calls or t.eval_calls for t in taken)
        trained = self._trained_ids()
        bad: list[tuple[str, Event]] = []
        for probe, account, t, layer_calls in zip(
            self.probes, self.accounts, taken, calls, strict=True
        ):
            m = probe.module
            s = StepLayer(
                step=step,
                micro_batches=micro,
                declared=declared,
                model_ran=ran,
                train_calls=t.train_calls,
                eval_calls=t.eval_calls,
                calls=tuple(layer_calls),
                sites=t.sites,
                outside_calls=t.outside_calls,
                forwards=forwards,
                momentum=m.momentum,
                frozen=self._frozen(m, trained, backwards),
                judge_momentum=not (isinstance(m, nn.SyncBatchNorm) and self.world > 1),
            )
            events = judge_step(s)
            account.add(s, events)
            bad += [(probe.name, ev) for ev in events]
        bad += self._rank_drift(step)
        self._grads.clear()
        self._hook_gradients()
        failing = [(name, ev) for name, ev in bad if self.fail_on.fails(ev.severity)]
        if self.strict and failing:
            name, ev = failing[0]
            self.close()
            raise BadTrainingStep(step, name, ev, WATCH_HINTS[ev.code])

    def _micro_batches(self, backwards: int) -> tuple[int, bool]:
        """Updates a layer should make this step, and whether that number was declared. A
        declared k covers one step; a step GradScaler skipped (no optimizer.step) folds its
        micro-batches into the next, which the backward passes show."""
        k = self.accumulate
        if k is None:
            return backwards, False
        return k * max(1, backwards // k), True

    def _trained_ids(self) -> set[int]:
        return {id(p) for group in self.optimizer.param_groups for p in group["params"]}

    def _frozen(self, m: nn.Module, trained: set[int], backwards: int) -> str:
        """Why the layer's affine parameters are not trained this step; "" when one of them is
        (or the layer has none)."""
        params = [p for p in (m.weight, m.bias) if isinstance(p, nn.Parameter)]
        if not params:
            return ""
        why = []
        for p in params:
            if not p.requires_grad:
                why.append("requires_grad=False")
            elif id(p) not in trained:
                why.append("not in the optimizer")
            elif backwards and not self._grads.get(id(p)):
                why.append("no gradient reached them")
            else:
                return ""
        return ", ".join(dict.fromkeys(why))

    def _drift_checked(self) -> bool:
        """Whether ranks can drift apart: distributed, and the buffers are not broadcast."""
        if self.world < 2 or not self.probes:
            return False
        if isinstance(self.model, DistributedDataParallel) and _syncs_buffers(self.model):
            self.notes.append(
                "DDP broadcasts rank 0's buffers before every forward: the ranks cannot drift "
                "apart, and the running statistics follow rank 0's batches alone"
            )
            return False
        if all(isinstance(p.module, nn.SyncBatchNorm) for p in self.probes):
            return False
        self.notes.append(
            f"{self.world} ranks, BN buffers not broadcast: compared across ranks at every "
            "watched step (bnaudit.distributed.compare_ranks)"
        )
        return True

    def _rank_drift(self, step: int) -> list[tuple[str, Event]]:
        if not self._drift:
            return []
        drift = compare_ranks(self.model)
        out = []
        index = {a.name: a for a in self.accounts}
        for f in drift.findings:
            ev = drift_event(f)
            if f.layer in index:
                index[f.layer].record(ev, step)
            out.append((f.layer, ev))
        return out

    # -- the user's side -----------------------------------------------------------------------

    def close(self) -> None:
        """Remove every hook the watcher put on the model, its parameters and the optimizer;
        idempotent. The report stays available."""
        if self.closed:
            return
        self.closed = True
        self._step_handle.remove()
        for h in self._grad_handles.values():
            h.remove()
        self._grad_handles.clear()
        for p in self.probes:
            p.remove()
        self.forwards.remove()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def report(self) -> WatchReport:
        """What the watched steps found so far: findings per layer with their steps."""
        notes = [
            f"watched {self.watched} of {self.steps} optimizer steps"
            + (f" (every {self.every}-th)" if self.every > 1 else ""),
            (
                f"micro-batches per step: {self.accumulate}, declared (accumulate)"
                if self.accumulate
                else "micro-batches per step: counted, as the backward passes between two "
                "optimizer.step() calls"
            ),
            *self.notes,
            *_shared_notes(self.accounts),
        ]
        if not self.watched:
            notes.append("no optimizer step was watched: nothing was judged")
        return WatchReport(
            layers=tuple(a.result(self.watched) for a in self.accounts),
            steps=self.steps,
            watched=self.watched,
            every=self.every,
            accumulate=self.accumulate,
            fail_on=self.fail_on,
            notes=tuple(notes),
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<bnaudit Watcher ({state}): {len(self.probes)} BN layers, {self.watched} of "
            f"{self.steps} steps watched>"
        )


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    accumulate: int | None = None,
    every: int = 1,
    strict: bool = False,
    *,
    fail_on: FailOn | str = FailOn.WARN,
) -> Watcher:
    """Watch every BN layer of `model` at the optimizer steps of a training loop.

    Args:
        model: the model being trained (a DDP wrapper too); only read, never changed.
        optimizer: the torch optimizer whose `step()` ends each training step.
        accumulate: forward micro-batches per optimizer step, each expected to update every BN
            layer once; None: counted, as the backward passes between two steps.
        every: watch every N-th step only (steps 1, 1 + N, ...); the others cost nothing.
        strict: raise `BadTrainingStep` at the first step with a finding at `fail_on`.
        fail_on: the lowest severity that fails `report().passed` (and `strict`).

    Returns:
        The watcher: a context manager; `close()` ends it, `report()` says what it found.
    """
    return Watcher(
        model, optimizer, accumulate=accumulate, every=every, strict=strict, fail_on=fail_on
    )


def _shared_notes(accounts: list[LayerAccount]) -> list[str]:
    """One note per number of call sites k > 1: the layers called k times in one forward."""
    by_sites: dict[int, list[str]] = {}
    for a in accounts:
        if a.sites > 1:
            by_sites.setdefault(a.sites, []).append(plain(a.name))
    return [
        f"shared BN module(s), called at {k} sites of each forward of the model: "
        f"{', '.join(names)}; {k} updates per micro-batch are expected, and the running "
        f"statistics are a blend of the {k} sites' (bnaudit check judges each site: shared-bn)"
        for k, names in sorted(by_sites.items())
    ]


def _watchable(m: nn.Module) -> bool:
    """A torch BN layer with running statistics: what a train-mode forward updates."""
    return isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None


def _syncs_buffers(ddp: DistributedDataParallel) -> bool:
    """Whether DDP copies rank 0's buffers to every rank before each forward: the attribute is
    `forward_sync_buffers` from torch 2.13, `broadcast_buffers` before."""
    for name in ("forward_sync_buffers", "broadcast_buffers"):
        value = getattr(ddp, name, None)
        if isinstance(value, bool):
            return value
    return True


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
