"""Conv/linear → BN folding: finding the pairs, checking the fold, judging its numeric risk.

Deployment tools fold every eval-mode BN into the conv or linear before it. The fold is checked
on the layer's real inputs (the first samples of the audit's own first eval-mode pass): the
folded conv's output against conv → BN in eval mode, in the model's own dtype. Its risk is
judged from the folded weights:
- float16: any |W'| or |b'| above 65504 overflows;
- int8 per-tensor: a tensor shares one scale, max|W'|/127, so an output channel whose largest
  weight is a small fraction of the tensor's keeps few quantization levels. Levels of a
  channel = 127·max|W'_c| / max|W'|; the fold is at risk when the median channel keeps fewer
  than `findings.MIN_INT8_LEVELS` (it then has less than 3 bits of its own).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as tf
from torch import Tensor, nn

from bnaudit import formulas as F
from bnaudit.batches import call_model
from bnaudit.errors import describe
from bnaudit.layers import Kind, LayerAttrs, layer_kind

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Pair:
    conv: str
    bn: str


@dataclass(frozen=True)
class Pairs:
    pairs: tuple[Pair, ...]
    method: str  # "torch.fx" or "module order"
    note: str = ""  # why tracing failed, when it did


@dataclass(frozen=True)
class FoldCheck:
    conv: str
    checked: bool = False  # run on the first batch (False: no batch, or the pair did not run)
    max_err: float = math.nan  # folded against unfolded, on the first batch
    ratio: float = math.nan  # worst err / tolerance
    weight_max: float = math.nan  # max |W'| and |b'|
    int8_levels: float = math.nan  # median channel's int8 per-tensor levels


def find_pairs(model: nn.Module) -> Pairs:
    """Conv/linear → BN pairs: from the traced graph, else from module order (said so)."""
    modules = dict(model.named_modules())
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # tracing fails on data-dependent control flow, among others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Pairs(_by_order(modules), "module order", f"torch.fx tracing failed: {first}")
    found = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable_bn(modules.get(str(node.target))):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(str(src.target)), FOLDABLE)
            and len(src.users) == 1  # the conv's output feeds nothing else
            and _fits(modules[str(src.target)], modules[str(node.target)])
        ):
            found.append(Pair(str(src.target), str(node.target)))
    return Pairs(tuple(found), "torch.fx")


class _Tracer(torch.fx.Tracer):
    """Keeps every BN-like module a leaf: FrozenBatchNorm and BN subclasses live outside
    torch.nn, and tracing into them would hide them from the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return layer_kind(m) is not None or super().is_leaf_module(m, qualname)


def _by_order(modules: dict[str, nn.Module]) -> tuple[Pair, ...]:
    leaves = [(n, m) for n, m in modules.items() if n and not list(m.children())]
    return tuple(
        Pair(a, b)
        for (a, conv), (b, bn) in itertools.pairwise(leaves)
        if isinstance(conv, FOLDABLE) and _foldable_bn(bn) and _fits(conv, bn)
    )


def _foldable_bn(m: nn.Module | None) -> bool:
    """Plain BN with running stats. A subclass that overrides forward does more than BN (an
    activation, say): folding only its normalisation is not a fold of the layer."""
    if m is None or getattr(m, "running_mean", None) is None:
        return False
    a = LayerAttrs.of(m)
    return a.kind in (Kind.BATCH, Kind.FROZEN) and not a.overrides_forward


def _fits(conv: nn.Module, bn: nn.Module) -> bool:
    out = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    return out == bn.running_mean.numel() and getattr(conv, "groups", 1) >= 1


def folded(conv: nn.Module, a: LayerAttrs) -> tuple[Tensor, Tensor]:
    """W', b' in the conv's dtype, computed in float64."""
    assert a.running_mean is not None and a.running_var is not None
    bias = conv.bias.detach().double() if conv.bias is not None else None
    w, b = F.fold(
        conv.weight.detach().double(), bias, a.running_mean, a.running_var, a.weight, a.bias, a.eps
    )
    return w.to(conv.weight.dtype), b.to(conv.weight.dtype)


def _apply(conv: nn.Module, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    if isinstance(conv, nn.Linear):
        return tf.linear(x, w, b)
    return conv._conv_forward(x, w, b)


def risk(conv: nn.Module, a: LayerAttrs) -> tuple[float, float]:
    """(max |W'| and |b'|, int8 per-tensor levels of the median output channel)."""
    w, b = folded(conv, a)
    w, b = w.double(), b.double()
    per_channel = w.abs().reshape(w.shape[0], -1).amax(1)
    top = float(per_channel.max())
    levels = float((127 * per_channel / top).median()) if top > 0 else math.nan
    return max(top, float(b.abs().max())), levels


# Eval-mode BN and conv act on each sample alone, so a fold that holds on one sample holds on
# all of them; checking one keeps the extra conv work a small fraction of one pass.
FOLD_SAMPLES = 1
FOLD_BLOCK = 1 << 18  # values compared at a time


class FoldWatch:
    """Checks every pair's fold during one eval-mode forward that runs anyway (the audit's first).

    The paired conv's input (its first `FOLD_SAMPLES` samples) is kept until the BN's output
    arrives, compared with the folded conv's output, and dropped: at most one pair's slice is
    held at a time, whatever the model's depth.
    """

    def __init__(self, model: nn.Module, pairs: Pairs) -> None:
        self.modules = dict(model.named_modules())
        self.pairs = pairs
        self.inputs: dict[str, Tensor] = {}
        self.errors: dict[str, tuple[float, float]] = {}  # bn: (max_err, ratio)
        self.failed: dict[str, str] = {}  # bn: why the folded conv could not run

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        handles = []
        for p in self.pairs.pairs:
            conv, bn = self.modules[p.conv], self.modules[p.bn]
            handles.append(conv.register_forward_pre_hook(functools.partial(self._keep, p)))
            handles.append(bn.register_forward_hook(functools.partial(self._compare, p)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.inputs.clear()

    def _keep(self, p: Pair, conv: nn.Module, inputs: tuple[Any, ...]) -> None:
        if p.bn not in self.errors and inputs and isinstance(inputs[0], Tensor):
            self.inputs[p.conv] = inputs[0].detach()[:FOLD_SAMPLES].clone()

    def _compare(self, p: Pair, bn: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        x = self.inputs.pop(p.conv, None)
        if x is None or bn.training or p.bn in self.errors or not isinstance(out, Tensor):
            return
        conv = self.modules[p.conv]
        ref = out.detach()[:FOLD_SAMPLES]
        w, b = folded(conv, LayerAttrs.of(bn))
        rtol, atol = F.tolerance(ref.dtype)

        def errors(got: Tensor, spread: Tensor | None) -> tuple[float, float]:
            """Max |got − ref| and its ratio to atol + rtol·(|ref| + spread), in float64
            blocks (a 3-D activation's float64 copies would outweigh the forward)."""
            errs, ratios = [], []
            parts = [t.reshape(-1).split(FOLD_BLOCK) for t in (got, ref)]
            extra = (
                spread.reshape(-1).split(FOLD_BLOCK)
                if spread is not None
                else [None] * len(parts[0])
            )
            for g, r, sp in zip(*parts, extra, strict=True):
                err = F.mismatch(g.double(), r.double())
                tol = atol + rtol * r.double().abs()
                if sp is not None:
                    tol = tol + rtol * sp.double()
                errs.append(err.max())
                ratios.append(torch.where(err == 0, err, err / tol).max())
            # torch's max keeps a NaN (Python's max would drop it).
            return float(torch.stack(errs).max()), float(torch.stack(ratios).max())

        try:
            with torch.no_grad():
                got = _apply(conv, x, w, b)
                if got.shape == ref.shape:
                    # Within atol + rtol·|ref| the fold passes, and the ratio to that smaller
                    # tolerance bounds the full one: the second conv below is not needed.
                    quick = errors(got, None)
                    if quick[1] <= 1:
                        self.errors[p.bn] = quick
                        return
                    # Each output sums products in the model's dtype: its rounding scales with
                    # the same sum of |x|·|W'|, hence that term in the tolerance.
                    spread = _apply(conv, x.abs(), w.abs(), b.abs())
        except (RuntimeError, ValueError, TypeError) as exc:  # a conv subclass, say
            self.failed[p.bn] = describe(exc)
            return
        if got.shape != ref.shape:
            self.failed[p.bn] = f"the folded output is {tuple(got.shape)}, BN's {tuple(ref.shape)}"
            return
        self.errors[p.bn] = errors(got, spread)

    def results(self) -> dict[str, FoldCheck]:
        """Per BN layer: the fold's error (when its pair ran) and its numeric risk."""
        out = {}
        for p in self.pairs.pairs:
            weight_max, levels = risk(self.modules[p.conv], LayerAttrs.of(self.modules[p.bn]))
            max_err, ratio = self.errors.get(p.bn, (math.nan, math.nan))
            checked = p.bn in self.errors
            out[p.bn] = FoldCheck(p.conv, checked, max_err, ratio, weight_max, levels)
        return out


def check_folds(model: nn.Module, pairs: Pairs, batch: Any | None) -> dict[str, FoldCheck]:
    """Per BN layer: the fold's error on `batch` (one eval-mode forward) and its numeric risk."""
    watch = FoldWatch(model, pairs)
    if batch is not None and pairs.pairs:
        model.eval()
        with torch.no_grad(), watch.watching():
            call_model(model, batch)
    return watch.results()


def fold_model(model: nn.Module, pairs: Pairs) -> nn.Module:
    """A folded copy: each paired conv/linear carries its BN, the BN becomes nn.Identity."""
    folded_model = copy.deepcopy(model).eval()
    modules = dict(folded_model.named_modules())
    for p in pairs.pairs:
        conv = modules[p.conv]
        w, b = folded(conv, LayerAttrs.of(modules[p.bn]))
        with torch.no_grad():
            conv.weight.copy_(w)
            if conv.bias is None:
                conv.bias = nn.Parameter(b)
            else:
                conv.bias.copy_(b)
        folded_model.set_submodule(p.bn, nn.Identity())
    return folded_model
