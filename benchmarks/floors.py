"""The measured floors under an audit's time: what hooks that do less than the audit cost.

Each floor is the plain passes (`bench.plain_passes`) with hooks on every BN layer during the
eval- and train-mode pass of each batch, as the audit hooks them (the impact passes take no
hook), timed interleaved with the plain passes and the audit (`bench.time_in_process`):

- "empty": an empty pre-hook and forward hook on each layer, as many as the audit registers:
  torch's hook dispatch, the floor under any hook-based audit;
- "read": the forward hook reads x and y once (a torch sum of each): the memory traffic that
  measuring a call at all takes;
- "kernel": the forward hook runs the audit's own exact kernel (`bnaudit.measure.fused.Prepared`) on
  x and y, nothing else: the floor of the exact per-call measurement, without the audit's
  bookkeeping (running-stat undo, kept rows, grouping of small layers, diagnosis).

The difference between the "kernel" floor and the audit is the audit's own work around the
kernel, plus the fold check and the work after the passes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import models
from torch import Tensor, nn

KINDS = ("empty", "read", "kernel")
WHAT = {
    "empty": "empty hooks",
    "read": "read x and y once",
    "kernel": "exact kernel per call",
}


def _empty(module: nn.Module, *args: Any) -> None:
    return None


def _read(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
    inputs[0].sum()
    output.sum()


def _kernel_hook(module: nn.Module) -> Callable[..., None]:
    from bnaudit.core.layers import LayerAttrs
    from bnaudit.measure import fused

    a = LayerAttrs.of(module)
    running = (a.running_mean, a.running_var) if a.has_running_stats else None
    prepared = fused.Prepared(a.weight, a.bias, a.eps, running, a.num_features)  # type: ignore[arg-type]

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        batch = module.training or running is None
        prepared.measure(inputs[0], output, None if batch else running, output.dtype)

    return hook


@contextmanager
def _removed_after(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def hooked(model: nn.Module, kind: str) -> Iterator[None]:
    """Every BN layer of `model` with the floor hooks of `kind` (see the module docstring)."""
    handles = []
    for m in models.bn_layers(model):
        handles.append(m.register_forward_pre_hook(_empty))
        hook = {"empty": _empty, "read": _read}.get(kind) or _kernel_hook(m)
        handles.append(m.register_forward_hook(hook))
    with _removed_after(handles):
        yield


@contextmanager
def moments_hooked(model: nn.Module) -> Iterator[None]:
    """Every BN layer of `model` computes the exact float64 batch mean and variance of its input
    (`fused.Prepared.moments`, the kernel recalibration uses) before its call: the floor of a
    recalibration with exact statistics, on top of update_bn's passes."""
    from bnaudit.core.layers import LayerAttrs
    from bnaudit.measure import fused

    handles = []
    for m in models.bn_layers(model):
        a = LayerAttrs.of(m)
        prepared = fused.Prepared(a.weight, a.bias, a.eps, None, a.num_features)

        def hook(module: nn.Module, inputs: tuple[Any, ...], p: Any = prepared) -> None:
            p.moments(inputs[0])

        handles.append(m.register_forward_pre_hook(hook))
    with _removed_after(handles):
        yield


def floor_passes(bench: Any, model: nn.Module, batches: list[Tensor], kind: str) -> None:
    """The plain passes, the eval- and train-mode ones with the floor hooks of `kind`."""
    with hooked(model, kind):
        bench.probed_passes(model, batches)
    bench.impact_passes(model, batches)


HEADER = [
    "model",
    "plain passes s",
    *(f"{WHAT[k]} / plain" for k in KINDS),
    "the audit's hooked passes / plain",
    "audit / plain",
]


def row(name: str, r: Any) -> list[str]:
    """One model's floors and the audit, each a median ratio to the plain passes of the same
    rounds (`r`: a `bench.InProcess` measured `with_floors`)."""
    got = r.floor_ratios()
    return [
        name,
        f"{statistics.median(r.timing.plain):.3f}",
        *(f"{got[k]:.2f}" for k in KINDS),
        f"{r.hooked_ratio():.2f}",
        f"**{r.timing.ratio:.2f}**",
    ]
