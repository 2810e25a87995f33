"""Finding BatchNorm layers, snapshotting their attributes, and putting their state back."""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import UninitializedParameter

from bnaudit.core.errors import ModelError
from bnaudit.core.untrusted import shorten

# Every torch BN flavour (1d/2d/3d, Lazy*, SyncBatchNorm) subclasses _BatchNorm.
BN_MODULE_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm,)

# The forwards that compute plain BN; a subclass overriding forward may compute something else.
_STANDARD_FORWARDS = frozenset(
    {_BatchNorm.forward, nn.SyncBatchNorm.forward, _InstanceNorm.forward}
)
# A state dict stores neither eps nor momentum. eps is assumed to be torch's default (the static
# audit says so); momentum is unknown, NaN, because None already means "cumulative average".
DEFAULT_EPS = 1e-5
UNKNOWN_MOMENTUM = math.nan

# FrozenBatchNorm (torchvision, detectron2) is a plain module: it is recognised by these buffers.
_FROZEN_BUFFERS = frozenset({"running_mean", "running_var"})
# timm's BatchNormAct2d (and SyncBatchNormAct, FrozenBatchNormAct2d) normalise, then call these
# children in this order: the first one's input is the normalised value.
ACT_CHILDREN = ("drop", "act")


@dataclass(frozen=True)
class KnownAttrs:
    """What a compiled archive (TorchScript, torch.export) still tells about a BN layer."""

    type_name: str
    eps: float = DEFAULT_EPS
    momentum: float | None = UNKNOWN_MOMENTUM


class LayerKind(str, enum.Enum):
    """How a layer normalises, which decides the formulas the audit checks it against."""

    BATCH = "batch"  # _BatchNorm: batch statistics in train mode, running ones in eval
    INSTANCE = "instance"  # InstanceNorm(track_running_stats=True): per-sample statistics
    FROZEN = "frozen"  # FrozenBatchNorm-style: always the eval formula, never updated


def layer_kind(module: nn.Module) -> LayerKind | None:
    if isinstance(module, _BatchNorm):
        return LayerKind.BATCH
    if isinstance(module, _InstanceNorm):
        return LayerKind.INSTANCE if module.track_running_stats else None
    if isinstance(module, _NormBase):
        return None
    own = {name for name, _ in module.named_buffers(recurse=False)}
    if own >= _FROZEN_BUFFERS and _vector_stats(module):
        return LayerKind.FROZEN
    return None


def _vector_stats(module: nn.Module) -> bool:
    """running_mean and running_var are 1-D of one size, as in a FrozenBatchNorm."""
    mean, var = module.running_mean, module.running_var
    return (
        isinstance(mean, Tensor)
        and isinstance(var, Tensor)
        and mean.dim() == 1
        and mean.shape == var.shape
    )


def find_bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every BN-like layer, in registration order, each once.

    A wrapper holding a BN module (a graph library's BatchNorm around nn.BatchNorm1d, say) is
    not BN itself: only the inner module is found, so it is audited once.
    """
    found = [(name, m) for name, m in model.named_modules() if layer_kind(m) is not None]
    for name, m in found:
        if any(isinstance(p, UninitializedParameter) for p in m.parameters(recurse=False)):
            raise ModelError(
                f"layer {name} ({type(m).__name__}) is not materialised yet: load a state dict "
                "or run one forward pass before auditing it"
            )
    return found


def other_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """For each BN layer registered under several names (`self.b = self.a`), its first name
    (the one `find_bn_layers` gives) and the others; state_dict() lists it under each."""
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if layer_kind(m) is not None:
            names.setdefault(id(m), []).append(name)
    return {found[0]: tuple(found[1:]) for found in names.values() if len(found) > 1}


def act_tap(module: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, child) whose input is the layer's normalised value, in a BN subclass that applies
    dropout and an activation after normalising (timm's BatchNormAct2d); None for any other.

    Recognised by its children alone (only `drop` and/or `act`) and a forward of its own: the
    audit then reads the normalisation where it happens, before what follows it. Whether that
    input really is the BN formula is measured like any output; a miss is a finding.
    """
    kind = layer_kind(module)
    if kind is None or (
        kind is not LayerKind.FROZEN and type(module).forward in _STANDARD_FORWARDS
    ):
        return None
    children = dict(module.named_children())
    if not children or not set(children) <= set(ACT_CHILDREN):
        return None
    name = next(n for n in ACT_CHILDREN if n in children)
    return name, children[name]


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
    kind: LayerKind = LayerKind.BATCH
    counter_dtype: torch.dtype | None = None  # of num_batches_tracked, None without one
    counter_problem: str = ""  # why the stored counter is not a count (then T is None)

    @classmethod
    def of(cls, module: nn.Module) -> LayerAttrs:
        kind = layer_kind(module) or LayerKind.BATCH
        # InstanceNorm has the buffer but never counts: its T says nothing.
        nbt = None if kind is LayerKind.INSTANCE else getattr(module, "num_batches_tracked", None)
        count, problem = read_counter(nbt)
        weight = getattr(module, "weight", None)
        momentum = getattr(module, "momentum", None) if kind is not LayerKind.FROZEN else None
        return cls(
            type_name=type(module).__name__,
            num_features=int(
                module.running_mean.numel() if kind is LayerKind.FROZEN else module.num_features
            ),
            eps=float(getattr(module, "eps", 1e-5)),
            momentum=None if momentum is None else float(momentum),
            affine=weight is not None,
            track_running_stats=module.running_mean is not None,
            weight=_float64(weight),
            bias=_float64(getattr(module, "bias", None)),
            running_mean=_float64(module.running_mean),
            running_var=_float64(module.running_var),
            num_batches_tracked=count,
            dtype=weight.dtype if weight is not None else _buffer_dtype(module),
            buffer_dtype=None if module.running_mean is None else module.running_mean.dtype,
            overrides_forward=kind is not LayerKind.FROZEN
            and type(module).forward not in _STANDARD_FORWARDS,
            kind=kind,
            counter_dtype=None if nbt is None else nbt.dtype,
            counter_problem=problem,
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
        frozen = "num_batches_tracked" not in tensors
        known = known or KnownAttrs("FrozenBatchNorm-style" if frozen else "BatchNorm")
        mean, var = tensors["running_mean"], tensors["running_var"]
        weight = tensors.get("weight")
        nbt = tensors.get("num_batches_tracked")
        count, problem = read_counter(nbt)
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
            num_batches_tracked=count,
            dtype=weight.dtype if weight is not None else mean.dtype,
            buffer_dtype=mean.dtype,
            overrides_forward=False,
            kind=LayerKind.FROZEN if frozen else LayerKind.BATCH,
            counter_dtype=None if nbt is None else nbt.dtype,
            counter_problem=problem,
        )

    @property
    def has_running_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None

    @property
    def momentum_known(self) -> bool:
        return self.momentum is None or not math.isnan(self.momentum)


def read_counter(t: Tensor | None) -> tuple[int | None, str]:
    """num_batches_tracked as a count, or (None, why it is not one).

    Any real dtype is a count when it holds one whole non-negative number: `Module.type()`
    converts every tensor, the counter included (`.float()` leaves it alone), and
    load_state_dict copies a float counter into an int64 one without a word.
    """
    if t is None:
        return None, ""
    if t.numel() != 1:
        return None, f"shape {tuple(t.shape)} ({t.dtype}), not one number"
    if t.dtype == torch.bool or t.is_complex():
        return None, f"dtype {t.dtype}, not a number of batches"
    value = t.detach().reshape(()).item()
    shown = f"{value:g} ({t.dtype})" if isinstance(value, float) else f"{value} ({t.dtype})"
    if isinstance(value, float) and not math.isfinite(value):
        return None, shown
    if value < 0:
        return None, f"{shown}, negative"
    if value != int(value):
        return None, f"{shown}, not a whole number"
    return int(value), ""


def counter_notes(dtypes: Mapping[str, torch.dtype | None], then: str) -> list[str]:
    """One note per num_batches_tracked dtype other than torch's int64, naming the layers
    (layer name → the counter's dtype, None without one); `then` ends each note."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, dtype in dtypes.items():
        if dtype is not None and dtype != torch.int64:
            by_dtype.setdefault(dtype, []).append(name)
    return [
        f"num_batches_tracked stored as {str(dtype).removeprefix('torch.')} in {len(names)} "
        f"layer{'s' if len(names) > 1 else ''}: {shorten(names)}{then}"
        for dtype, names in by_dtype.items()
    ]


def _float64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64, copy=True)


def _buffer_dtype(module: nn.Module) -> torch.dtype:
    for b in module.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.get_default_dtype()


@contextlib.contextmanager
def preserved(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """Restore every module's mode, every buffer and the BN layers' momentum on exit.

    Every buffer, not only BN's: forwards update other state too (quantization observers,
    EMA modules), and an auditor must leave all of it as it was. Buffers are copied back in
    place, so tensors the caller holds stay the ones in the model.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    momenta = [(m, m.momentum) for _, m in layers if hasattr(m, "momentum")]
    try:
        yield
    finally:
        with torch.no_grad():
            for live, saved in buffers:
                live.copy_(saved)
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
