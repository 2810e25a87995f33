"""Conv/linear → BN folding: checking the fold of each pair, judging its numeric risk.

Deployment tools fold every eval-mode BN into the conv or linear whose output it receives (the pairs
come from the dataflow observed on the first batch: `bnaudit.measure.dataflow`). The fold is checked
on the layer's real inputs (the first sample of the audit's own first eval-mode pass, or a window of
it): the folded conv's output against conv → BN in eval mode, in the model's own dtype. Its risk is
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
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as tf
from torch import Tensor, nn

from bnaudit.core import formulas as F
from bnaudit.core.errors import describe
from bnaudit.core.layers import LayerAttrs, find_bn_layers, preserved
from bnaudit.inputs.calls import call_model
from bnaudit.measure import fused
from bnaudit.measure.dataflow import Dataflow, Pairs


@dataclass(frozen=True)
class FoldCheck:
    conv: str
    checked: bool = False  # run on the first batch (False: no batch, or the pair did not run)
    max_err: float = math.nan  # folded against unfolded, on the first batch
    ratio: float = math.nan  # worst err / tolerance
    weight_max: float = math.nan  # max |W'| and |b'|
    int8_levels: float = math.nan  # median channel's int8 per-tensor levels


def folded(conv: nn.Module, a: LayerAttrs) -> tuple[Tensor, Tensor]:
    """W', b' in the conv's dtype, computed in float64 (`formulas.fold`)."""
    assert a.running_mean is not None and a.running_var is not None
    weight, dtype = conv.weight.detach(), conv.weight.dtype
    bias = conv.bias.detach().double() if conv.bias is not None else None
    scale = F.fold_scale(a.running_var, a.weight, a.eps)
    b = F.fold_bias(bias, a.running_mean, scale, a.bias).to(dtype)
    # A ResNet-50's 23 M weights: one pass of the kernel instead of a float64 product tensor
    # and its conversion, which took longer than a sample's forward.
    w = fused.fold_weight(weight, scale)
    if w is None:
        w = F.fold_weight(weight, scale).to(dtype)  # float64 (the statistics are), rounded
    return w, b


def _apply(conv: nn.Module, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    if isinstance(conv, nn.Linear):
        return tf.linear(x, w, b)
    return conv._conv_forward(x, w, b)


def risk(conv: nn.Module, a: LayerAttrs) -> tuple[float, float]:
    """(max |W'| and |b'|, int8 per-tensor levels of the median output channel)."""
    return _risk(*folded(conv, a))


def _risk(w: Tensor, b: Tensor) -> tuple[float, float]:
    """`risk` of the folded W', b' (in the conv's dtype)."""
    # max |w| = max(|max w|, |min w|), without an |w| tensor; |·| and max are exact in any
    # float dtype, so float64 after them is the same number (NaN stays NaN).
    rows = w.reshape(w.shape[0], -1)
    per_channel = torch.maximum(rows.amax(1).abs(), rows.amin(1).abs()).double()
    b = b.double()
    top = float(per_channel.max())
    levels = float((127 * per_channel / top).median()) if top > 0 else math.nan
    return max(top, float(b.abs().max())), levels


# Eval-mode BN and conv act on each sample alone, so a fold that holds on one sample holds on
# all of them; checking one keeps the extra conv work a small fraction of one pass.
FOLD_SAMPLES = 1
FOLD_BLOCK = 1 << 18  # values compared at a time
# ... but not at batch 1 or 2, where one sample is half a pass (a U-Net at 256², a video net): a
# conv's output is local, so a sample larger than this many output positions per channel is
# checked on a window of its input, both sides (conv → BN, the folded conv) computed on it. The
# window keeps the copy of each conv's input small as well (made at every conv call).
FOLD_POSITIONS = 64


@dataclass(frozen=True)
class Kept:
    """What a conv call keeps for the fold check: its input's first sample, or a window of it
    (`window`: the BN output must then be computed on it, not taken from the forward)."""

    x: Tensor
    window: bool = False


def window_of(conv: nn.Module, x: Tensor) -> Tensor | None:
    """A leading window of `x` (one sample, [1, C, *S]) whose conv output has about
    `FOLD_POSITIONS` positions per channel; None when the sample is no larger than that."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or x.dim() != len(conv.kernel_size) + 2:
        return None
    dims = len(conv.kernel_size)
    side = round(FOLD_POSITIONS ** (1 / dims))
    lengths = [
        min(size, side * stride + dilation * (k - 1))
        for size, stride, dilation, k in zip(
            x.shape[2:], conv.stride, conv.dilation, conv.kernel_size, strict=True
        )
    ]
    if lengths == list(x.shape[2:]):
        return None
    return x[(..., *(slice(0, n) for n in lengths))]


class FoldWatch:
    """Finds the fold pairs and checks each fold during one eval-mode forward that runs anyway
    (the audit's first): see `bnaudit.measure.dataflow` for what makes a pair.

    Each conv/linear call keeps its input's first `FOLD_SAMPLES` samples while its output is
    alive and unused elsewhere; a BN that receives that output compares its own output with the
    folded conv's on them. Only pairs are judged: `results()` has nothing for another BN.
    The BN layers' attributes are read when it is made (`Dataflow.attrs`): make it right before
    the forward it watches.
    """

    def __init__(self, model: nn.Module) -> None:
        self.flow = Dataflow(model, keep=self._keep, arrived=self._compare)
        self.modules = self.flow.modules
        self.errors: dict[str, tuple[float, float]] = {}  # bn: (max_err, ratio)
        # bn: `risk`, from the W', b' its check folded (the same stored weights and stats)
        self.risks: dict[str, tuple[float, float]] = {}
        self._failed: dict[str, str] = {}  # bn: why the folded conv could not run

    def watching(self) -> contextlib.AbstractContextManager[None]:
        return self.flow.watching()

    def pairs(self) -> Pairs:
        return self.flow.pairs()

    def failed(self) -> dict[str, str]:
        """Per paired BN layer whose fold check could not run: why."""
        paired = {p.bn for p in self.pairs().pairs}
        return {bn: why for bn, why in self._failed.items() if bn in paired}

    @staticmethod
    def _keep(conv: nn.Module, inputs: tuple[Any, ...]) -> Kept | None:
        if not inputs or not isinstance(inputs[0], Tensor):
            return None
        x = inputs[0].detach()[:FOLD_SAMPLES]
        part = window_of(conv, x)
        return Kept(x.clone()) if part is None else Kept(part.clone(), window=True)

    def _compare(self, conv_name: str, bn_name: str, kept: Any, bn: nn.Module, out: Any) -> None:
        if kept is None or bn.training or bn_name in self.errors or not isinstance(out, Tensor):
            return
        conv, x = self.modules[conv_name], kept.x
        w, b = folded(conv, self.flow.attrs.get(bn_name) or LayerAttrs.of(bn))
        with contextlib.suppress(RuntimeError, ValueError, IndexError):  # results() says why
            self.risks[bn_name] = _risk(w, b)
        ref = self._reference(conv, bn_name, kept, bn, out)
        if ref is None:
            return
        rtol, atol = F.tolerance(ref.dtype)

        def errors(got: Tensor, spread: Tensor | None) -> tuple[float, float]:
            """Max |got − ref| and its ratio to atol + rtol·(|ref| + spread), in float64
            blocks (a 3-D activation's float64 copies would outweigh the forward)."""
            if spread is None and 0 < got.numel() <= FOLD_BLOCK:
                quick = _finite_errors(got.double(), ref.double(), rtol, atol)
                if quick is not None:
                    return quick
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
                        self.errors[bn_name] = quick
                        return
                    # Each output sums products in the model's dtype: its rounding scales with
                    # the same sum of |x|·|W'|, hence that term in the tolerance.
                    spread = _apply(conv, x.abs(), w.abs(), b.abs())
        except (RuntimeError, ValueError, TypeError) as exc:  # a conv subclass, say
            self._failed[bn_name] = describe(exc)
            return
        if got.shape != ref.shape:
            why = f"the folded output is {tuple(got.shape)}, BN's {tuple(ref.shape)}"
            self._failed[bn_name] = why
            return
        self.errors[bn_name] = errors(got, spread)

    def _reference(
        self, conv: nn.Module, bn_name: str, kept: Kept, bn: nn.Module, out: Tensor
    ) -> Tensor | None:
        """conv → BN in eval mode on the kept input: the forward's own output, or on a window
        computed here (None, with the reason kept, when that cannot run)."""
        if not kept.window:
            return out.detach()[:FOLD_SAMPLES]
        # The module's forward, not its call: the audit's hooks are for the model's own calls.
        # In eval mode it reads the running statistics and changes nothing.
        try:
            with torch.no_grad():
                return bn.forward(conv._conv_forward(kept.x, conv.weight, conv.bias))
        except (RuntimeError, ValueError, TypeError) as exc:
            self._failed[bn_name] = describe(exc)
            return None

    def results(self) -> dict[str, FoldCheck]:
        """Per paired BN layer: the fold's error (when its check ran) and its numeric risk."""
        out = {}
        for p in self.pairs().pairs:
            weight_max, levels = self.risks.get(p.bn) or risk(
                self.modules[p.conv], LayerAttrs.of(self.modules[p.bn])
            )
            max_err, ratio = self.errors.get(p.bn, (math.nan, math.nan))
            checked = p.bn in self.errors
            out[p.bn] = FoldCheck(p.conv, checked, max_err, ratio, weight_max, levels)
        return out


def _finite_errors(
    got: Tensor, ref: Tensor, rtol: float, atol: float
) -> tuple[float, float] | None:
    """`errors` without a spread, where every difference is finite (else None): the general
    formula's numbers with fewer operations. With got and ref finite, `mismatch` is |got − ref|,
    and err/tol is 0 where err is: tol ≥ atol > 0. A NaN or Inf in either, or a difference that
    overflows, makes the largest difference non-finite and leaves it to the general formula."""
    err = (got - ref).abs()
    top = float(err.max())
    if not math.isfinite(top):
        return None
    return top, float((err / (atol + rtol * ref.abs())).max())


def check_folds(model: nn.Module, batch: Any) -> tuple[Pairs, dict[str, FoldCheck]]:
    """One eval-mode forward on `batch`: the pairs observed, and each one's fold check."""
    watch = FoldWatch(model)
    with preserved(model, find_bn_layers(model)), torch.no_grad():
        model.eval()
        with watch.watching():
            call_model(model, batch)
    return watch.pairs(), watch.results()


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
