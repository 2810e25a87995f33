"""`fused.Prepared` (a layer's kernel arguments converted once) gives exactly `fused.measure`'s
numbers: the same kernel on the same arguments, or `measure` itself where the kernel does not
apply. `tests/test_fused.py` checks `measure` against the general float64 path."""

from __future__ import annotations

import torch
from hypothesis import given

from bnaudit.measure import fused
from tests.test_fused import SETTINGS, Call, Case, cases, make, measured, needs_numba


def prepared(call: Call) -> fused.Prepared:
    return fused.Prepared(call.weight, call.bias, call.eps, call.running, call.x.shape[1])


def assert_same(got: fused.Measured, want: fused.Measured) -> None:
    for name in ("mean", "var", "err", "ratio"):
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=0, atol=0, equal_nan=True, msg=name
        )
    assert (got.finite, got.worst) == (want.finite, want.worst)


@needs_numba
@SETTINGS
@given(case=cases())
def test_prepared_measures_as_measure(case: Case) -> None:
    call = make(case)
    p = prepared(call)
    assert p._kernel(call.x, call.y, call.running, call.y.dtype) is not None  # the kernel ran
    assert_same(p.measure(call.x, call.y, call.running, call.y.dtype), measured(call))


@needs_numba
def test_prepared_hands_other_calls_to_measure() -> None:
    """Other running stats than the prepared ones, float64, another width: `measure`'s path."""
    call = make(Case((4, 3, 5), False, torch.float32, 0.0, False, "none", 1))
    assert call.running is not None
    p = prepared(call)
    other = (call.running[0].clone(), call.running[1] * 2)
    assert p._kernel(call.x, call.y, other, call.y.dtype) is None
    want = fused.measure(call.x, call.y, call.weight, call.bias, call.eps, other, call.y.dtype)
    assert_same(p.measure(call.x, call.y, other, call.y.dtype), want)
    x64, y64 = call.x.double(), call.y.double()
    assert p._kernel(x64, y64, call.running, torch.float64) is None
    assert (
        fused.Prepared(None, None, 1e-5, None, 4)._kernel(call.x, call.y, None, call.y.dtype)
        is None
    )


@needs_numba
@SETTINGS
@given(case=cases())
def test_prepared_moments_are_moments(case: Case) -> None:
    x = make(case).x
    got, want = fused.Prepared(None, None, 0.0, None, x.shape[1]).moments(x), fused.moments(x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
