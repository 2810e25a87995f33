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
from bnaudit.measure import fused
from bnaudit.measure.fold import (
    FOLD_BLOCK,
    FOLD_POSITIONS,
    FOLD_SAMPLES,
    FoldCheck,
    FoldWatch,
    Kept,
    _apply,
    _finite_errors,
    _risk,
    folded,
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


def reference_folded(conv: nn.Module, a: LayerAttrs) -> tuple[Tensor, Tensor]:
    """`folded` as it was: a float64 copy of the weight first."""
    bias = conv.bias.detach().double() if conv.bias is not None else None
    w, b = F.fold(
        conv.weight.detach().double(), bias, a.running_mean, a.running_var, a.weight, a.bias, a.eps
    )
    return w.to(conv.weight.dtype), b.to(conv.weight.dtype)


def reference_risk(w: Tensor, b: Tensor) -> tuple[float, float]:
    """`_risk` as it was: |W'| and its maxima in float64."""
    w, b = w.double(), b.double()
    per_channel = w.abs().reshape(w.shape[0], -1).amax(1)
    top = float(per_channel.max())
    levels = float((127 * per_channel / top).median()) if top > 0 else math.nan
    return max(top, float(b.abs().max())), levels


class ReferenceWatch(FoldWatch):
    """`FoldWatch` before its shortcuts: `_keep`, `_compare` and `results` as they were (the
    whole first sample, never a window of it)."""

    @staticmethod
    def _keep(conv: nn.Module, inputs: tuple) -> Tensor | None:  # type: ignore[type-arg]
        if inputs and isinstance(inputs[0], Tensor):
            return inputs[0].detach()[:FOLD_SAMPLES].clone()
        return None

    def _compare(self, conv_name: str, bn_name: str, x, bn: nn.Module, out) -> None:  # type: ignore[no-untyped-def]
        if x is None or bn.training or bn_name in self.errors or not isinstance(out, Tensor):
            return
        conv = self.modules[conv_name]
        ref = out.detach()[:FOLD_SAMPLES]
        w, b = reference_folded(conv, LayerAttrs.of(bn))
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
            conv, a = self.modules[p.conv], LayerAttrs.of(self.modules[p.bn])
            weight_max, levels = reference_risk(*reference_folded(conv, a))
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
    batch = ((torch.randn(5, 6).to(dtype), torch.randn(2, 3, 4, 4).to(dtype)),)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_weights_and_risk_are_the_float64_formulation(
    dtype: torch.dtype, bias: bool
) -> None:
    torch.manual_seed(3)
    conv, bn = nn.Conv2d(8, 16, 3, bias=bias).to(dtype), nn.BatchNorm2d(16).to(dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(16))
        bn.running_var.copy_(torch.rand(16) * 3 + 1e-4)
        bn.weight.copy_(torch.randn(16))
        conv.weight.mul_(7)
    a = LayerAttrs.of(bn)
    (w, b), (w0, b0) = folded(conv, a), reference_folded(conv, a)
    assert w.dtype == w0.dtype == dtype
    assert torch.equal(w, w0) and torch.equal(b, b0)
    assert same_bits(_risk(w, b), reference_risk(w0, b0))


class Wide(nn.Module):
    """Samples larger than FOLD_POSITIONS outputs per channel: conv1d, a strided reflect-padded
    conv2d, a dilated conv3d, each into a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv1d(2, 4, 5, padding=2), nn.BatchNorm1d(4)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(4)
        self.c3, self.bn3 = nn.Conv3d(2, 3, 3, dilation=2, bias=False), nn.BatchNorm3d(3)

    def forward(self, xs: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        a, b, c = xs
        return self.bn1(self.c1(a)).sum() + self.bn2(self.c2(b)).sum() + self.bn3(self.c3(c)).sum()


@pytest.mark.parametrize("defect", DEFECTS)
def test_a_window_of_a_large_sample_gives_the_whole_samples_verdict(defect: str) -> None:
    torch.manual_seed(0)
    model = Wide()
    planted(model, "none")
    with torch.no_grad():
        if defect == "nan":
            model.bn2.running_var[0] = math.nan
        elif defect == "inf":
            model.bn2.running_mean[0] = math.inf
        elif defect == "tiny var":
            model.bn2.running_var.fill_(1e-30)
            model.bn2.eps = 0.0
        elif defect == "cancellation":
            model.bn2.weight.fill_(1.0)
            model.bn2.bias.fill_(1e4)
    batch = ((torch.randn(2, 2, 9000), torch.randn(1, 3, 200, 160), torch.randn(2, 2, 30, 24, 40)),)
    convs = [model.c1, model.c2, model.c3]
    kept = [FoldWatch._keep(m, (x[:1],)) for m, x in zip(convs, batch[0], strict=True)]
    assert all(isinstance(k, Kept) and k.window for k in kept)
    with torch.no_grad():  # the window's output: about FOLD_POSITIONS per channel
        sizes = [m(k.x)[0, 0].numel() for m, k in zip(convs, kept, strict=True)]  # type: ignore[union-attr]
    assert all(0.9 * FOLD_POSITIONS <= n <= 1.3 * FOLD_POSITIONS for n in sizes), sizes
    with single_thread():
        fast, slow = run(FoldWatch, model, batch), run(ReferenceWatch, model, batch)
    assert set(fast) == set(slow) == {"bn1", "bn2", "bn3"}
    for bn in fast:
        f, s = fast[bn], slow[bn]
        assert f.checked and s.checked, bn
        assert (f.weight_max, f.int8_levels) == (s.weight_max, s.int8_levels) or defect == "nan"
        # The same verdict (within the tolerance, beyond it, or not finite) on the window.
        verdict = [math.isnan(c.ratio) or c.ratio > 1 for c in (f, s)]
        assert verdict[0] == verdict[1], (bn, f, s)
    if defect == "none":
        assert all(c.ratio <= 1 for c in fast.values())


@pytest.mark.parametrize("seed", range(4))
def test_the_fold_kernel_rounds_each_product_as_torch_does(seed: int) -> None:
    """float32 weights times float64 scales, specials included: the numba kernel's W' (what
    `folded` uses for float32 weights) against torch's float64 product rounded to float32."""
    k = fused.kernels()
    if k is None:
        pytest.skip(f"the numba kernels are not loaded: {fused.unavailable()}")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(33, 5, 3, 3, generator=gen) * 10.0 ** torch.randint(
        -40, 38, (33, 1, 1, 1), generator=gen
    )
    w.view(-1)[:6] = torch.tensor([math.nan, math.inf, -math.inf, 3e38, 1e-45, -0.0])
    scale = torch.rand(33, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -30, 30, (33,), generator=gen
    )
    scale[:4] = torch.tensor([0.0, 1e300, math.nan, 1 / 3], dtype=torch.float64)
    got = fused.fold_weight(w, scale)
    want = (w.reshape(33, -1) * scale[:, None]).reshape(w.shape).to(torch.float32)
    assert got is not None
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # every bit, NaN too
