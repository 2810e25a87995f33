"""The fused measurement (`bnaudit.measure.fused`) gives the numbers of today's general float64
path.

The reference is what `_Probe._measure_general` computes on float64 copies: `batch_stats`,
`normalize`, `mismatch`, `elementwise_tolerance`. Both fast implementations are checked against
it, the numba kernel and the float64 blocks in torch (`BNAUDIT_KERNEL=torch`), on many shapes,
dtypes, memory formats and planted mismatches: the verdict of every channel is the same and the
ratios agree within 1e-9 (relative, for ratios above 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import bnaudit
from bnaudit.core import blocked
from bnaudit.core import formulas as F
from bnaudit.measure import fused
from tests import nets
from tests.test_fast_paths import assert_same_report, general_only, grouping

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)
RATIO_AGREEMENT = 1e-9
DEFECTS = ("none", "near-tolerance", "unbiased", "eps x10", "1-ulp", "large")
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@contextlib.contextmanager
def torch_kernel() -> Iterator[None]:
    """The float64 blocks in torch instead of the numba kernel."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(fused.KERNEL_ENV, "torch")
        yield


needs_numba = pytest.mark.skipif(fused.kernels() is None, reason="numba is not installed")


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    channels_last: bool
    dtype: torch.dtype
    offset: float
    batch_stats: bool
    defect: str
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    spatial = draw(st.lists(st.integers(1, 9), min_size=0, max_size=3))
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 9)), *spatial)
    return Case(
        shape=shape,
        channels_last=len(shape) in (4, 5) and draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        offset=draw(st.sampled_from([0.0, 3.0, 300.0])),
        batch_stats=draw(st.booleans()),
        defect=draw(st.sampled_from(DEFECTS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@dataclass(frozen=True)
class Call:
    x: Tensor
    y: Tensor
    weight: Tensor
    bias: Tensor
    eps: float
    running: tuple[Tensor, Tensor] | None


def make(case: Case) -> Call:
    """An input and an output of the BN formula in the case's dtype, with the planted defect."""
    gen = torch.Generator().manual_seed(case.seed)
    c, nd = case.shape[1], len(case.shape)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    x64 = randn(*case.shape) * 2 + F.channel_view(randn(c) + case.offset, nd)
    if case.defect == "large":
        x64 = x64 * 1e3
    x = x64.to(case.dtype)
    if case.channels_last:
        fmt = torch.channels_last if nd == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    weight, bias, eps = randn(c), randn(c), 1e-5
    running = None
    mean, var = F.batch_stats(x.double())
    if not case.batch_stats:
        mean = mean + randn(c) * 0.1
        var = var * (1 + torch.rand(c, generator=gen, dtype=torch.float64))
        running = (mean, var)
    used_mean, used_var, used_eps = mean, var, eps
    if case.defect == "unbiased":
        n = F.values_per_channel(x)
        used_var = var * F.bessel(n) if n > 1 else var * 1.5
    elif case.defect == "eps x10":
        used_eps = eps * 10
    ref = F.normalize(x.double(), used_mean, used_var, weight, bias, used_eps)
    if case.defect == "near-tolerance":  # one value a factor 0.5 to 1.5 of its tolerance away
        tol = F.elementwise_tolerance(x.double(), ref, mean, var, weight, eps, case.dtype)
        flat = ref.reshape(-1).clone()
        i = int(torch.randint(flat.numel(), (1,), generator=gen))
        step = float(tol.reshape(-1)[i]) * (0.5 + float(torch.rand(1, generator=gen)))
        flat[i] += step
        ref = flat.reshape(ref.shape)
    y = ref.to(case.dtype)
    if case.defect == "1-ulp":  # every third value one unit in the last place away
        bits = y.contiguous().view(INT_VIEW[case.dtype]).reshape(-1).clone()
        bits[::3] += 1
        y = bits.view(case.dtype).reshape(y.shape)
    y = y.contiguous(memory_format=torch.channels_last) if case.channels_last and nd == 4 else y
    if case.channels_last and nd == 5:
        y = y.contiguous(memory_format=torch.channels_last_3d)
    return Call(x, y, weight, bias, eps, running)


def reference(call: Call) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean, var, max err, max ratio as `_Probe._measure_general` computes them."""
    x64, y64 = call.x.double(), call.y.double()
    mean, var = F.batch_stats(x64)
    ref_mean, ref_var = (mean, var) if call.running is None else call.running
    ref = F.normalize(x64, ref_mean, ref_var, call.weight, call.bias, call.eps)
    err = F.mismatch(y64, ref)
    u = F.sum_roundoff(call.x) if call.running is None else 0.0
    rounding = F.stat_rounding(F.values_per_channel(x64), mean, var, u) if u else None
    tol = F.elementwise_tolerance(
        x64, ref, ref_mean, ref_var, call.weight, call.eps, call.y.dtype, rounding
    )
    dims = F.stat_dims(x64)
    ratio = torch.where(err == 0, err, err / tol).amax(dim=dims)
    return mean, var, err.amax(dim=dims), ratio


def measured(call: Call) -> fused.Measured:
    return fused.measure(
        call.x, call.y, call.weight, call.bias, call.eps, call.running, call.y.dtype
    )


def assert_agrees(got: fused.Measured, call: Call) -> None:
    mean, var, err, ratio = reference(call)
    assert got.finite
    scale = float(call.x.double().abs().max())
    torch.testing.assert_close(got.mean, mean, rtol=1e-13, atol=1e-14 * scale)
    torch.testing.assert_close(got.var, var, rtol=1e-11, atol=1e-14 * scale**2)
    assert bool(((got.ratio - ratio).abs() <= RATIO_AGREEMENT * ratio.clamp_min(1)).all()), (
        got.ratio,
        ratio,
    )
    assert bool(((got.err - err).abs() <= 1e-12 * (err + scale)).all())
    # The verdict: every channel on the same side of 1 (a ratio within the agreement of 1
    # itself is a coin toss of float64 rounding in either path).
    edge = (ratio - 1).abs() <= RATIO_AGREEMENT
    assert bool(((got.ratio <= 1) == (ratio <= 1))[~edge].all())
    assert got.worst == pytest.approx(float(ratio.max()), rel=RATIO_AGREEMENT, abs=RATIO_AGREEMENT)


@needs_numba
@SETTINGS
@given(case=cases())
def test_kernel_measures_as_the_general_path(case: Case) -> None:
    call = make(case)
    assert fused._kernel_measure(  # the kernel itself ran, not the fallback
        call.x, call.y, call.weight, call.bias, call.eps, call.running, call.y.dtype
    )
    assert_agrees(measured(call), call)


@settings(SETTINGS, max_examples=60)
@given(case=cases())
def test_torch_fallback_measures_as_the_general_path(case: Case) -> None:
    call = make(case)
    with torch_kernel():
        assert_agrees(measured(call), call)


@needs_numba
@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernel_reports_nan_and_inf(where: str, value: float, channels_last: bool) -> None:
    call = make(Case((4, 5, 6, 7), channels_last, torch.float32, 1.0, True, "none", 0))
    t = (call.x if where == "x" else call.y).clone()
    t[2, 3, 4, 5] = value
    x, y = (t, call.y) if where == "x" else (call.x, t)
    got = fused.measure(x, y, call.weight, call.bias, call.eps, None, y.dtype)
    assert not got.finite


@needs_numba
def test_layouts_the_kernel_does_not_take_fall_back() -> None:
    call = make(Case((4, 5, 6, 7), False, torch.float32, 1.0, True, "none", 0))
    args = (call.weight, call.bias, call.eps, None, torch.float32)
    x, y = call.x.transpose(2, 3), call.y.transpose(2, 3)  # neither NCHW nor channels-last
    assert fused._kernel_measure(x, y, *args) is None
    assert fused._kernel_measure(call.x.double(), call.y.double(), *args) is None
    got = fused.measure(x, y, *args)  # the float64 blocks
    assert_agrees(got, Call(x, y, call.weight, call.bias, call.eps, None))


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fused.cache_dir() == tmp_path / "bnaudit" / "numba"


# --- whole audits: the kernel, the torch fallback and the general path agree -----------------


def conv_model(dtype: torch.dtype, channels_last: bool) -> tuple[nn.Module, list[Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
    )
    model[1].momentum = None
    nets.calibrate(model, nets.make_images(64, seed=1), 16)
    images = list(torch.split(nets.make_images(48, seed=2), 16))
    model = model.eval().to(dtype)
    images = [i.to(dtype) for i in images]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = [i.contiguous(memory_format=torch.channels_last) for i in images]
    return model, images


@pytest.mark.parametrize(
    ("dtype", "channels_last"),
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)],
)
def test_audits_agree_across_paths(dtype: torch.dtype, channels_last: bool) -> None:
    model, images = conv_model(dtype, channels_last)
    fast = bnaudit.audit(model, images)
    with torch_kernel():
        blocks = bnaudit.audit(model, images)
        note = fused.unavailable()
    with grouping(0), general_only():
        general = bnaudit.audit(model, images)
    assert_same_report(fast, general)
    # The torch path says so in the first note; everything else is the same.
    assert note is not None and blocks.notes[0] == note
    assert_same_report(dataclasses.replace(blocks, notes=blocks.notes[1:]), general)


@needs_numba
@pytest.mark.parametrize("defect", ["none", "eps x10", "1-ulp"])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_parallel_rows_kernel_gives_the_serial_numbers(
    defect: str, batch_stats: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large NCHW calls share their channels among threads on a machine with cores to spare:
    each channel's numbers are those of the one-thread kernel, bit for bit."""
    monkeypatch.setattr(fused, "machine_busy", lambda: False)
    call = make(Case((4, 7, 100, 100), False, torch.float32, 3.0, batch_stats, defect, 5))
    assert call.x.numel() >= fused.PARALLEL_VALUES
    k = fused.kernels()
    assert k is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fused._rows_kernel(k, call.x) is k.measure_rows_parallel
        parallel = measured(call)
        torch.set_num_threads(1)
        assert fused._rows_kernel(k, call.x) is k.measure_rows
        serial = measured(call)
    finally:
        torch.set_num_threads(threads)
    for name in ("mean", "var", "err", "ratio"):
        assert torch.equal(getattr(parallel, name), getattr(serial, name)), name
    assert parallel.worst == serial.worst and parallel.finite == serial.finite
    # The planted defects are seen (at this N, torch's float64 var_mean is not the reference to
    # 1e-9 of a ratio: the kernel's compensated sums are the more exact).
    ratio = reference(call)[3]
    assert bool(((parallel.ratio <= 1) == (ratio <= 1)).all())
    assert torch.allclose(parallel.ratio, ratio, rtol=1e-6)


def test_the_report_says_when_the_torch_path_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """One note names the path that ran and how to get the fast one; none with the kernel."""
    model, images = conv_model(torch.float32, False)
    if fused.kernels() is not None:
        assert not [n for n in bnaudit.audit(model, images).notes if "torch path" in n]
    with torch_kernel():
        turned_off = [n for n in bnaudit.audit(model, images).notes if "torch path" in n]
    assert len(turned_off) == 1 and "BNAUDIT_KERNEL=torch is set" in turned_off[0]
    monkeypatch.setattr(fused, "_kernels", "numba is not installed")
    missing = [n for n in bnaudit.audit(model, images).notes if "torch path" in n]
    assert len(missing) == 1
    assert "numba is not installed" in missing[0] and "pip install numba" in missing[0]


def test_the_torch_path_runs_on_one_thread_and_puts_the_count_back() -> None:
    """The block operations run on one torch thread (no parallel region per small op, which
    a busy machine slows 10-17x), and the caller's thread count is restored, also on error."""
    seen: list[int] = []
    blocked_fn = blocked.one_thread(lambda fail: seen.append(torch.get_num_threads()) or fail())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        blocked_fn(lambda: None)
        with pytest.raises(ZeroDivisionError):
            blocked_fn(lambda: 1 / 0)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


BENCH_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    ("factory", "shape"),
    [
        ("audio1d", (2, 1, 2000)),  # [B, C, T]: rows of hundreds of values
        ("unet", (1, 3, 32, 32)),  # skip concatenations, a single sample per batch
        ("temporal3d", (1, 3, 4, 16, 16)),  # BatchNorm3d
        ("crnn", (2, 1, 32, 32)),  # conv + BN2d, then a GRU
    ],
)
def test_the_benchmark_shapes_agree_across_paths(factory: str, shape: tuple[int, ...]) -> None:
    """The shapes `make bench` times (`benchmarks/shapes.py`), small: the numba kernel and the
    torch path give the general float64 path's report."""
    import importlib
    import sys

    sys.path.insert(0, str(BENCH_DIR))
    try:
        models = importlib.import_module("models")
        torch.manual_seed(0)
        model = models.calibrate(getattr(models, factory)(), [torch.randn(shape) for _ in range(2)])
    finally:
        sys.path.remove(str(BENCH_DIR))
    batches = [torch.randn(shape) for _ in range(3)]
    fast = bnaudit.audit(model, batches)
    with torch_kernel():
        blocks = bnaudit.audit(model, batches)
    with grouping(0), general_only():
        general = bnaudit.audit(model, batches)
    assert_same_report(fast, general)
    if fused.kernels() is not None:  # the torch path's report opens with the note that says so
        blocks = dataclasses.replace(blocks, notes=blocks.notes[1:])
    assert_same_report(blocks, general)


@needs_numba
def test_a_busy_machine_keeps_large_calls_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    call = make(Case((4, 7, 100, 100), False, torch.float32, 3.0, True, "none", 5))
    k = fused.kernels()
    assert k is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(fused, "machine_busy", lambda: True)
        assert fused._rows_kernel(k, call.x) is k.measure_rows
        monkeypatch.setattr(fused, "machine_busy", lambda: False)
        assert fused._rows_kernel(k, call.x) is k.measure_rows_parallel
    finally:
        torch.set_num_threads(threads)
