"""Finding BatchNorm layers, snapshotting their attributes, and putting their state back."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# Every torch BN flavour (1d/2d/3d, Lazy*, SyncBatchNorm) subclasses _BatchNorm.
BN_MODULE_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm,)

# The forwards that compute plain BN; a subclass overriding forward may compute something else.
_STANDARD_FORWARDS = frozenset({_BatchNorm.forward, nn.SyncBatchNorm.forward})

# A state dict stores neither eps nor momentum. eps is assumed to be torch's default (the static
# audit says so); momentum is unknown, NaN, because None already means "cumulative average".
DEFAULT_EPS = 1e-5
UNKNOWN_MOMENTUM = math.nan


@dataclass(frozen=True)
class KnownAttrs:
    """What a compiled archive (TorchScript, torch.export) still tells about a BN layer."""

    type_name: str
    eps: float = DEFAULT_EPS
    momentum: float | None = UNKNOWN_MOMENTUM


def find_bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """(qualified name, module) of every BN layer, in registration order, each module once."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BN_MODULE_TYPES)]


@dataclass(frozen=True)
class LayerAttrs:
    """A BN layer's attributes, copied as float64 on the layer's device.

    These are the γ, β, μ_r, σ²_r, ε, m, T of BN-NOTES; a copy, so the audit's own train-mode
    forwards cannot change what it compares against.
    """

    type_name: str
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: int | None
    dtype: torch.dtype
    buffer_dtype: torch.dtype | None  # of running_mean: half precision here loses the EMA
    overrides_forward: bool

    @classmethod
    def of(cls, module: _BatchNorm) -> LayerAttrs:
        nbt = getattr(module, "num_batches_tracked", None)
        weight = getattr(module, "weight", None)
        return cls(
            type_name=type(module).__name__,
            num_features=int(module.num_features),
            eps=float(module.eps),
            momentum=None if module.momentum is None else float(module.momentum),
            affine=bool(module.affine),
            track_running_stats=module.running_mean is not None,
            weight=_float64(weight),
            bias=_float64(getattr(module, "bias", None)),
            running_mean=_float64(module.running_mean),
            running_var=_float64(module.running_var),
            num_batches_tracked=None if nbt is None else int(nbt.item()),
            dtype=weight.dtype if weight is not None else _buffer_dtype(module),
            buffer_dtype=None if module.running_mean is None else module.running_mean.dtype,
            overrides_forward=type(module).forward not in _STANDARD_FORWARDS,
        )

    @classmethod
    def from_state(
        cls, tensors: Mapping[str, Tensor], *, known: KnownAttrs | None = None
    ) -> LayerAttrs:
        """A layer's attributes from its state-dict tensors (attribute name → tensor).

        Needs `running_mean` and `running_var`; `weight`, `bias` and `num_batches_tracked` may
        be missing (affine=False, FrozenBatchNorm). eps and momentum come from `known`, else
        they are DEFAULT_EPS (assumed) and UNKNOWN_MOMENTUM.
        """
        known = known or KnownAttrs(
            "BatchNorm" if "num_batches_tracked" in tensors else "FrozenBatchNorm-style"
        )
        mean, var = tensors["running_mean"], tensors["running_var"]
        weight = tensors.get("weight")
        nbt = tensors.get("num_batches_tracked")
        return cls(
            type_name=known.type_name,
            num_features=mean.numel(),
            eps=known.eps,
            momentum=known.momentum,
            affine=weight is not None,
            track_running_stats=True,
            weight=_float64(weight),
            bias=_float64(tensors.get("bias")),
            running_mean=_float64(mean),
            running_var=_float64(var),
            num_batches_tracked=None if nbt is None else int(nbt.reshape(-1)[0]),
            dtype=weight.dtype if weight is not None else mean.dtype,
            buffer_dtype=mean.dtype,
            overrides_forward=False,
        )

    @property
    def has_running_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None

    @property
    def momentum_known(self) -> bool:
        return self.momentum is None or not math.isnan(self.momentum)


def _float64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64, copy=True)


def _buffer_dtype(module: nn.Module) -> torch.dtype:
    for b in module.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.get_default_dtype()


@contextlib.contextmanager
def preserved(model: nn.Module, layers: list[tuple[str, _BatchNorm]]) -> Iterator[None]:
    """Restore every module's mode and every BN layer's buffers and momentum on exit.

    Buffers are copied back in place, so tensors the caller holds stay the ones in the model.
    """
    modes = [(m, m.training) for m in model.modules()]
    saved = [
        (m, m.momentum, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False)})
        for _, m in layers
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, buffers in saved:
                m.momentum = momentum
                for key, value in buffers.items():
                    getattr(m, key).copy_(value)
        for m, training in modes:
            m.training = training
