"""Why a layer's output does not match the BN formula: the usual explanations, each tested.

When a batch's output misses the formula, the hook evaluates every hypothesis below on that
batch (and only then: a matching layer costs nothing here). After the audit the hypothesis with
the smallest error is the explanation, if it matches within tolerance.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as tf
from torch import Tensor

from bnaudit.core import formulas as F
from bnaudit.core.keys import ACTIVATION_KEY
from bnaudit.measure.statistics import MaxTracker

# Activations a BN subclass may apply after normalising (timm's BatchNormAct2d, say).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "relu6": tf.relu6,
    "leaky_relu": tf.leaky_relu,
    "silu": tf.silu,
    "gelu": tf.gelu,
    "gelu(tanh)": functools.partial(tf.gelu, approximate="tanh"),
    "hardswish": tf.hardswish,
    "elu": tf.elu,
    "mish": tf.mish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


@dataclass(frozen=True)
class Case:
    """One batch of one layer: input, output, and the statistics the plain formula used."""

    x: Tensor  # float64
    y: Tensor  # float64
    mean: Tensor  # the statistics the correct formula normalises with ([C] or [B, C])
    var: Tensor
    batch_mean: Tensor  # the batch's own statistics, per channel
    batch_var: Tensor  # biased
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    n: int
    uses_batch_stats: bool
    dtype: torch.dtype
    # u of torch's in-order batch sums (`formulas.sum_roundoff`) when the formula normalises
    # with the batch statistics; 0.0 otherwise
    roundoff: float = 0.0


Hypothesis = tuple[str, str, Callable[[], Tensor], torch.dtype]


def hypotheses(c: Case) -> Iterator[Hypothesis]:
    """(key, explanation, the output it predicts, the dtype whose tolerance judges it).

    The prediction is a thunk: once a layer's explanation is settled only that one is computed.
    """
    norm = functools.partial(F.normalize, c.x, weight=c.weight, bias=c.bias, eps=c.eps)
    # The plain formula's output, computed once for every explanation that starts from it.
    plain = functools.cache(lambda: norm(mean=c.mean, var=c.var))
    yield from _other_statistics(c, norm)
    yield from _other_formula(c, plain)
    yield from _other_axes(c)
    for low in (torch.float16, torch.bfloat16):
        if F.tolerance(low)[0] > F.tolerance(c.dtype)[0]:
            name = str(low).removeprefix("torch.")
            yield name, f"{name} rounding", plain, low


def _other_statistics(c: Case, norm: Callable[..., Tensor]) -> Iterator[Hypothesis]:
    """The right formula with the wrong statistics: unbiased, running or batch ones."""
    if c.uses_batch_stats:
        yield (
            "unbiased",
            "normalisation with the unbiased variance",
            lambda: norm(mean=c.mean, var=c.var * F.bessel(c.n)),
            c.dtype,
        )
        running_mean, running_var = c.running_mean, c.running_var
        if running_mean is not None and running_var is not None:
            yield (
                "running-in-train",
                "the running statistics instead of the batch statistics",
                lambda: norm(mean=running_mean, var=running_var),
                c.dtype,
            )
    else:
        yield (
            "batch-in-eval",
            "batch statistics instead of the running statistics",
            lambda: norm(mean=c.batch_mean, var=c.batch_var),
            c.dtype,
        )


def _other_formula(c: Case, plain: Callable[[], Tensor]) -> Iterator[Hypothesis]:
    """The right statistics in a slightly different formula: eps, affine, an activation."""
    nd = c.x.dim()

    def outside() -> Tensor:
        normed = (c.x - F.channel_view(c.mean, nd)) / F.channel_view(c.var.sqrt() + c.eps, nd)
        return _affine(normed, c)

    yield "eps-outside", "eps outside the square root", outside, c.dtype
    other = _fitted_eps(c)
    if other is not None:
        yield (
            "eps",
            f"eps = {other:.3g} instead of the attribute {c.eps:.3g}",
            lambda: F.normalize(c.x, c.mean, c.var, c.weight, c.bias, other),
            c.dtype,
        )
    if c.weight is not None or c.bias is not None:
        yield (
            "no-affine",
            "no affine (gamma and beta not applied)",
            lambda: F.normalize(c.x, c.mean, c.var, None, None, c.eps),
            c.dtype,
        )
    for name, act in ACTIVATIONS.items():
        yield (
            f"{ACTIVATION_KEY}{name}",
            f"BN followed by {name}",
            functools.partial(lambda act: act(plain()), act),
            c.dtype,
        )


def _other_axes(c: Case) -> Iterator[Hypothesis]:
    """Statistics over the wrong dimensions: per sample, over the batch, channels last."""
    nd = c.x.dim()
    if nd < 3:
        return
    yield (
        "per-sample",
        "per-sample statistics (instance norm)",
        lambda: _stats_over(c, tuple(range(2, nd))),
        c.dtype,
    )
    yield (
        "batch-dim-only",
        "statistics over the batch dim only",
        lambda: _stats_over(c, (0,)),
        c.dtype,
    )
    if c.x.shape[-1] == c.x.shape[1]:
        yield (
            "channels-last",
            "statistics over the last dim (channels-last confusion)",
            lambda: _channels_last(c),
            c.dtype,
        )


def _affine(normed: Tensor, c: Case) -> Tensor:
    nd = normed.dim()
    if c.weight is not None:
        normed = normed * F.channel_view(c.weight, nd)
    if c.bias is not None:
        normed = normed + F.channel_view(c.bias, nd)
    return normed


def _stats_over(c: Case, dims: tuple[int, ...]) -> Tensor:
    var, mean = torch.var_mean(c.x, dim=dims, correction=0, keepdim=True)
    return _affine((c.x - mean) * torch.rsqrt(var + c.eps), c)


def _channels_last(c: Case) -> Tensor:
    """Statistics per last dim, and γ, β applied along it, as with a misread NHWC tensor."""
    dims = tuple(range(c.x.dim() - 1))
    var, mean = torch.var_mean(c.x, dim=dims, correction=0)
    y = (c.x - mean) * torch.rsqrt(var + c.eps)
    if c.weight is not None:
        y = y * c.weight
    if c.bias is not None:
        y = y + c.bias
    return y


def _fitted_eps(c: Case) -> float | None:
    """The ε that best explains the output's scale (least squares per channel, median)."""
    nd = c.x.dim()
    centred = c.x - F.channel_view(c.mean, nd)
    if c.weight is not None:
        centred = centred * F.channel_view(c.weight, nd)
    target = c.y - (F.channel_view(c.bias, nd) if c.bias is not None else 0)
    dims = F.stat_dims(c.x)
    scale = (target * centred).sum(dims) / centred.square().sum(dims)
    var = c.var if c.var.dim() == 1 else c.var.mean(0)
    value = float((1 / scale.square() - var).median())
    if not math.isfinite(value):
        return None
    value = max(value, 0.0)  # a forgotten eps fits as a tiny negative one
    if math.isclose(value, c.eps, rel_tol=1e-3):
        return None
    return value


@dataclass
class Diagnosis:
    """Per hypothesis, the worst error on the batches that missed the formula.

    When exactly one hypothesis fits the first batch that missed (timm's BatchNormAct: the
    activation), later batches test only that one, as long as it keeps fitting: the others
    already missed, so they can never be the explanation, and the explanation's own error stays
    measured on every batch. A batch it does not fit is diagnosed in full again (from then on,
    the other hypotheses' maxima count the batches where they were evaluated).
    """

    err_abs: dict[str, MaxTracker] = field(default_factory=dict)
    err_ratio: dict[str, MaxTracker] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    settled: str | None = None  # the only hypothesis that fitted the first diagnosed batch

    def add(self, c: Case) -> None:
        first = not self.labels
        if self.settled is not None:
            for key, label, predict, dtype in hypotheses(c):
                if key == self.settled:
                    err, ratio = _errors(c, predict(), dtype)
                    if bool(ratio <= 1):
                        self._record(key, label, err, ratio)
                        return
                    break
            self.settled = None  # it missed (or vanished): back to the full diagnosis
        fitting = []
        for key, label, predict, dtype in hypotheses(c):
            err, ratio = _errors(c, predict(), dtype)
            self._record(key, label, err, ratio)
            if bool(ratio <= 1):
                fitting.append(key)
        if first and len(fitting) == 1:
            self.settled = fitting[0]

    def _record(self, key: str, label: str, err: Tensor, ratio: Tensor) -> None:
        self.labels[key] = label  # the fitted eps may differ between batches: keep the last
        self.err_abs.setdefault(key, MaxTracker()).add(err)
        self.err_ratio.setdefault(key, MaxTracker()).add(ratio)

    def merge(self, other: Diagnosis) -> None:
        for key in other.labels:
            self.labels[key] = other.labels[key]
            self.err_abs.setdefault(key, MaxTracker()).merge(other.err_abs[key])
            self.err_ratio.setdefault(key, MaxTracker()).merge(other.err_ratio[key])

    def best(self) -> Explanation | None:
        """The best-fitting hypothesis, whether or not it matches within tolerance.

        Among those within tolerance the smallest error wins, so a loose fit (rounding to a
        lower precision, whose tolerance is wide) never hides an exact one.
        """
        found = [
            Explanation(key, self.labels[key], _value(self.err_abs[key]), _value(ratio))
            for key, ratio in self.err_ratio.items()
        ]
        found = [e for e in found if math.isfinite(e.ratio) and math.isfinite(e.max_err)]
        if not found:
            return None
        fitting = [e for e in found if e.ratio <= 1]
        if fitting:
            # Ties (the rounding hypotheses share one error) go to the first, tightest one.
            return min(fitting, key=lambda e: e.max_err)
        return min(found, key=lambda e: e.ratio)


def _errors(c: Case, ref: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Max |y − ref| and max ratio to the tolerance of one hypothesis on one batch."""
    err = F.mismatch(c.y, ref)
    rounding = F.stat_rounding(c.n, c.mean, c.var, c.roundoff) if c.roundoff else None
    tol = F.elementwise_tolerance(c.x, ref, c.mean, c.var, c.weight, c.eps, dtype, rounding)
    return err.amax(), torch.where(err == 0, err, err / tol).amax()


def _value(t: MaxTracker) -> float:
    return math.nan if t.value is None else float(t.value)


@dataclass(frozen=True)
class Explanation:
    key: str
    label: str
    max_err: float
    ratio: float

    @property
    def is_activation(self) -> bool:
        return self.key.startswith(ACTIVATION_KEY)
