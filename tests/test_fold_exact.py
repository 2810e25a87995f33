"""The fold check's shortcuts give the numbers of the formulation they replaced, bit for bit:
`_finite_errors` against the general blockwise formula, and whole fold checks (errors, risk)
against `ReferenceWatch`, a copy of `FoldWatch` as it was (every figure through the general
formula, the risk folded again in `results`), on varied models and planted defects.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from bnaudit.core import formulas as F
from bnaudit.core.errors import describe
from bnaudit.core.layers import LayerAttrs, find_bn_layers, preserved
from bnaudit.inputs.calls import call_model, to_call
from bnaudit.measure.fold import (
    FOLD_BLOCK,
    FOLD_SAMPLES,
    FoldCheck,
    FoldWatch,
    _apply,
    _finite_errors,
    folded,
    risk,
)
from tests.nets import GatedNet
from tests.reports import single_thread
from tests.test_metrics_stacked import same_bits


def reference_errors(
    got: Tensor, ref: Tensor, rtol: float, atol: float, spread: Tensor | None = None
) -> tuple[float, float]:
    """The general formula of `FoldWatch._compare.errors`, as it was."""
    errs, ratios = [], []
    parts = [t.reshape(-1).split(FOLD_BLOCK) for t in (got, ref)]
    extra = spread.reshape(-1).split(FOLD_BLOCK) if spread is not None else [None] * len(parts[0])
    for g, r, sp in zip(*parts, extra, strict=True):
        err = F.mismatch(g.double(), r.double())
        tol = atol + rtol * r.double().abs()
        if sp is not None:
            tol = tol + rtol * sp.double()
        errs.append(err.max())
        ratios.append(torch.where(err == 0, err, err / tol).max())
    return float(torch.stack(errs).max()), float(torch.stack(ratios).max())


class ReferenceWatch(FoldWatch):
    """`FoldWatch` before its shortcuts: `_compare` and `results` as they were."""

    def _compare(self, conv_name: str, bn_name: str, x, bn: nn.Module, out) -> None:  # type: ignore[no-untyped-def]
        if x is None or bn.training or bn_name in self.errors or not isinstance(out, Tensor):
            return
        conv = self.modules[conv_name]
        ref = out.detach()[:FOLD_SAMPLES]
        w, b = folded(conv, LayerAttrs.of(bn))
        rtol, atol = F.tolerance(ref.dtype)
        try:
            with torch.no_grad():
                got = _apply(conv, x, w, b)
                if got.shape == ref.shape:
                    quick = reference_errors(got, ref, rtol, atol)
                    if quick[1] <= 1:
                        self.errors[bn_name] = quick
                        return
                    spread = _apply(conv, x.abs(), w.abs(), b.abs())
        except (RuntimeError, ValueError, TypeError) as exc:
            self._failed[bn_name] = describe(exc)
            return
        if got.shape != ref.shape:
            self._failed[bn_name] = (
                f"the folded output is {tuple(got.shape)}, BN's {tuple(ref.shape)}"
            )
            return
        self.errors[bn_name] = reference_errors(got, ref, rtol, atol, spread)

    def results(self) -> dict[str, FoldCheck]:
        out = {}
        for p in self.pairs().pairs:
            weight_max, levels = risk(self.modules[p.conv], LayerAttrs.of(self.modules[p.bn]))
            max_err, ratio = self.errors.get(p.bn, (math.nan, math.nan))
            checked = p.bn in self.errors
            out[p.bn] = FoldCheck(p.conv, checked, max_err, ratio, weight_max, levels)
        return out


SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e300, -1e300, 3e38]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(0, 2**31 - 1),
    st.sampled_from([torch.float32, torch.float64]),
    st.lists(st.tuples(st.booleans(), st.integers(0, 299), st.sampled_from(SPECIAL)), max_size=3),
    st.sampled_from([0.0, 1e-7, 1e-5, 1.0]),
)
def test_finite_errors_are_the_general_formula(
    n: int, seed: int, dtype: torch.dtype, specials: list, noise: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    ref = (torch.randn(n, generator=gen, dtype=torch.float64) * 10).to(dtype)
    got = (ref.double() + noise * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    for in_got, i, value in specials:
        (got if in_got else ref)[i % n] = torch.tensor(value, dtype=torch.float64).to(dtype)
    rtol, atol = F.tolerance(dtype)
    want = reference_errors(got, ref, rtol, atol)
    quick = _finite_errors(got.double(), ref.double(), rtol, atol)
    finite = bool(torch.isfinite(got.double() - ref.double()).all())
    assert (quick is not None) == finite  # the shortcut exactly where every difference is finite
    if quick is not None:
        assert same_bits(quick, want)


class Net(nn.Module):
    """Linear → BN1d, conv → BN2d (twice, one with a folded-in bias), conv3d → BN3d."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.lin, self.bn0 = nn.Linear(6, 12), nn.BatchNorm1d(12)
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv3d(4, 2, 1), nn.BatchNorm3d(2)
        self.to(dtype)

    def forward(self, xs: tuple[Tensor, Tensor]) -> Tensor:
        v, img = xs
        a = self.bn0(self.lin(v)).sum()
        h = torch.relu(self.bn1(self.conv1(img)))
        h = self.bn2(self.conv2(h))
        return a + self.bn3(self.conv3(h.unsqueeze(2))).sum()


def run(watch_type: type[FoldWatch], model: nn.Module, batch) -> dict[str, FoldCheck]:  # type: ignore[no-untyped-def]
    watch = watch_type(model)
    with preserved(model, find_bn_layers(model)), torch.no_grad():
        model.eval()
        with watch.watching():
            call_model(model, to_call(model, batch, None))
    return watch.results()


def planted(model: nn.Module, defect: str) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn_like(m.running_mean))
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn_like(m.weight))
        bn = model.bn1 if hasattr(model, "bn1") else model[1]
        if defect == "nan":
            bn.running_var[0] = math.nan
        elif defect == "inf":
            bn.running_mean[0] = math.inf
        elif defect == "tiny var":  # a huge scale: the fold's rounding needs the spread term
            bn.running_var.fill_(1e-30)
            bn.eps = 0.0
        elif defect == "cancellation":  # conv2 sums large inputs to small outputs
            bn.weight.fill_(1.0)
            bn.bias.fill_(1e4)
            model.conv2.weight.copy_(
                torch.tensor([1.0, -1.0, 1.0, -1.0]).expand(4, 4)[..., None, None]
            )
    return model


DEFECTS = ["none", "nan", "inf", "tiny var", "cancellation"]


@pytest.mark.parametrize("defect", DEFECTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_checks_are_the_reference_bit_for_bit(defect: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = planted(Net(dtype), defect)
    batch = ((torch.randn(5, 6).to(dtype), torch.randn(2, 3, 6, 6).to(dtype)),)
    with single_thread():
        fast, slow = run(FoldWatch, model, batch), run(ReferenceWatch, model, batch)
    assert set(fast) == set(slow) == {"bn0", "bn1", "bn2", "bn3"}
    for bn in fast:
        assert same_bits(fast[bn], slow[bn]), (bn, fast[bn], slow[bn])
    assert all(c.checked for c in fast.values())


@pytest.mark.parametrize("between", ["none", "dropout", "shape"])
def test_fold_checks_of_gated_nets_are_the_reference(between: str) -> None:
    torch.manual_seed(0)
    model = planted(GatedNet(between, "none"), "none")
    batch = torch.randn(2, 3, 8, 8)
    with single_thread():
        fast, slow = run(FoldWatch, model, batch), run(ReferenceWatch, model, batch)
    assert fast.keys() == slow.keys() and fast
    for bn in fast:
        assert same_bits(fast[bn], slow[bn]), bn
