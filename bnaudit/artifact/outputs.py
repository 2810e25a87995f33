"""The artifact and the checkpoint's model in eval mode on the same batches: their outputs, and
each exposed layer's output, compared as they stream (nothing is kept across batches)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.artifact.artifacts import Runner
from bnaudit.core.errors import DataError
from bnaudit.core.layers import find_bn_layers, preserved
from bnaudit.inputs.batches import InputChoice
from bnaudit.inputs.calls import to_call
from bnaudit.measure.progress import ProgressFn

# Largest difference relative to the largest |output| that still counts as the same output, by
# the artifact's dtype: float32 kernels of another library sum in another order (~1e-6 on the
# models tested), a folded conv rounds W·s once more; float16 keeps ~3 digits.
OUTPUT_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def output_rtol(dtype: torch.dtype) -> float:
    return OUTPUT_RTOL.get(dtype, OUTPUT_RTOL[torch.float32])


@dataclass
class Gap:
    """The largest |difference| and the largest |reference| seen so far."""

    max_abs: float = 0.0
    scale: float = 0.0

    def add(self, got: Tensor, want: Tensor) -> None:
        got, want = got.detach().double().reshape(-1), want.detach().double().reshape(-1)
        if got.shape != want.shape:
            self.max_abs = math.inf
            return
        diff = (got - want).abs()
        diff = torch.where(got.isnan() & want.isnan(), torch.zeros_like(diff), diff)
        self.max_abs = max(self.max_abs, float(diff.max()) if diff.numel() else 0.0, key=_nan_max)
        self.scale = max(self.scale, float(want.abs().max()) if want.numel() else 0.0)

    @property
    def rel(self) -> float:
        if math.isnan(self.max_abs) or math.isinf(self.max_abs):
            return self.max_abs
        return (
            self.max_abs / self.scale
            if self.scale > 0
            else (0.0 if self.max_abs == 0 else math.inf)
        )


def _nan_max(x: float) -> float:
    return math.inf if math.isnan(x) else x


@dataclass
class Compared:
    """End to end over every batch, and per exposed layer."""

    batches: int = 0
    output: Gap = field(default_factory=Gap)
    agree: int = 0  # samples whose top-1 class is the same
    classified: int = 0  # samples with [B, K] class scores (K > 1)
    width: int = 0  # K: what the top-1 agreement assumes is a number of classes
    layers: dict[str, Gap] = field(default_factory=dict)

    @property
    def top1(self) -> float | None:
        return self.agree / self.classified if self.classified else None


def compare_outputs(
    model: nn.Module,
    run: Runner,
    batches: Iterable[Any],
    exposed: Mapping[str, str],
    *,
    max_batches: int | None,
    choice: InputChoice,
    progress: ProgressFn | None = None,
) -> Compared:
    """Both on every batch; `exposed`: BN layer → the artifact tensor holding its output."""
    modules = dict(model.named_modules())
    out = Compared(layers={name: Gap() for name in exposed})
    seen: dict[str, Tensor] = {}
    hooks = [
        modules[name].register_forward_hook(_keep(seen, name))
        for name in exposed
        if name in modules
    ]
    try:
        with preserved(model, find_bn_layers(model)), torch.no_grad():
            model.eval()
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                call = to_call(model, batch, choice)
                want = model(*call.args, **call.kwargs)
                got, tensors = run(_device_args(call.args, call.kwargs))
                _compare_batch(out, got, want, tensors, exposed, seen)
                seen.clear()
                out.batches += 1
                if progress is not None:
                    progress(out.batches, None, "artifact comparison")
    finally:
        for h in hooks:
            h.remove()
    return out


def _keep(seen: dict[str, Tensor], name: str) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            seen[name] = output.detach()

    return hook


def _device_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if kwargs:
        raise DataError(
            "the batches feed the model by keyword (model(**batch)); an artifact takes positional "
            "inputs: use --input to choose the input element or key"
        )
    return tuple(a.detach().cpu() if isinstance(a, Tensor) else a for a in args)


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    if isinstance(x, dict):
        return next((v for v in x.values() if isinstance(v, Tensor)), None)
    return None


def _compare_batch(
    out: Compared,
    got: Any,
    want: Any,
    tensors: Mapping[str, Tensor],
    exposed: Mapping[str, str],
    seen: Mapping[str, Tensor],
) -> None:
    g, w = _first_tensor(got), _first_tensor(want)
    if g is None or w is None:
        raise DataError(
            f"the model returns {type(want).__name__} and the artifact {type(got).__name__}: "
            "bnaudit compares the first output tensor of each, and found none"
        )
    w = w.detach().cpu()
    out.output.add(g, w)
    if w.dim() == 2 and w.shape[1] > 1 and g.shape == w.shape:
        out.agree += int((g.argmax(1) == w.argmax(1)).sum())
        out.classified += w.shape[0]
        out.width = w.shape[1]
    for layer, tensor in exposed.items():
        if layer in seen and tensor in tensors:
            out.layers[layer].add(tensors[tensor], seen[layer].cpu())
