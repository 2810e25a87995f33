"""The shapes users have, on both install paths, on a quiet machine and under contention.

One of bench.py's SECTIONS. Each model is built here with calibrated running statistics (a
cumulative average over train-mode passes: the state a trained checkpoint is in; training on
2 cores would take longer than the whole benchmark). In one process, per model: the plain
passes the audit needs, the audit with the numba kernel (what `pip install bnaudit` gives)
and the audit on the torch path (`BNAUDIT_KERNEL=torch`: what runs where numba has no wheel),
interleaved, median of the per-round ratios to the plain passes of the same round. Then the
same rounds again while BURNERS other processes spin on the CPU (a shared CI runner): started
here, stopped in `finally`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import floors
from timing import timed

TARGET_QUIET = 1.25  # audit / plain passes, the default install, quiet
TARGET_BUSY = 1.5  # the same with BURNERS busy processes
TARGET_FALLBACK = 1.5  # torch path / numba kernel, both under contention
BURNERS = 2
SETTLE_S = 0.5  # the burners running before the first timed round
# name -> (factory of models.py, one batch, batches, what). Sized for `make bench`'s 20 minutes
# on 2 cores: per model 100-150 × its plain passes (1 warm-up and 5 rounds quiet, 5 rounds with
# the burners, where 2 threads run 3-5× slower; each round plain + numba + torch path ≈ 5×
# plain): about 7-9 minutes in all, the 224² MobileNetV2 about half of it.
CASES: dict[str, tuple[str, tuple[int, ...], int, str]] = {
    "mobilenetv2-224": ("mobilenetv2_like", (32, 3, 224, 224), 1, "MobileNetV2, 224², batch 32"),
    "audio1d": ("audio1d", (16, 1, 16000), 1, "M5-style 1-D conv audio net, [B, C, T] raw audio"),
    "unet": ("unet", (1, 3, 256, 256), 1, "U-Net with skip concatenations, 256², 18 BN2d"),
    "temporal3d": ("temporal3d", (2, 3, 8, 112, 112), 1, "R(2+1)D-style video net, 8 BN3d"),
    "crnn": ("crnn", (16, 1, 32, 128), 1, "CRNN: conv + BN2d, then a bidirectional GRU"),
    # the benchmark's original five, one batch of the first section's shape (the MLP its eight:
    # its batches are tiny)
    "resnet50": ("resnet50_like", (16, 3, 112, 112), 1, "ResNet-50 layout"),
    "mobilenetv2": ("mobilenetv2_like", (16, 3, 112, 112), 1, "MobileNetV2 layout, 112²"),
    "mlp400": ("mlp400", (64, 64), 8, "400 × (Linear → BatchNorm1d → ReLU)"),
    "cnn3d": ("cnn3d", (4, 3, 16, 64, 64), 1, "6 × (Conv3d → BatchNorm3d → ReLU)"),
    "effnet": ("efficientnet_b0_like", (16, 3, 112, 112), 1, "EfficientNet-B0, BatchNormAct2d"),
}
QUICK_SHAPES = {
    "mobilenetv2-224": (2, 3, 32, 32),
    "audio1d": (2, 1, 2000),
    "unet": (1, 3, 32, 32),
    "temporal3d": (1, 3, 4, 16, 16),
    "crnn": (2, 1, 32, 32),
    "resnet50": (2, 3, 32, 32),
    "mobilenetv2": (2, 3, 32, 32),
    "mlp400": (8, 64),
    "cnn3d": (2, 3, 4, 16, 16),
    "effnet": (2, 3, 32, 32),
}
# A busy loop that also ends when the benchmark is gone (killed without its `finally`).
BURN = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""
SIDES = ("plain", "numba", "torch")  # torch: BNAUDIT_KERNEL=torch
KERNEL_ENV = "BNAUDIT_KERNEL"


@dataclass(frozen=True)
class Measured:
    """One model: seconds per side and round, quiet and under contention."""

    name: str
    shape: tuple[int, ...]
    batches: int
    layers: int
    quiet: dict[str, list[float]]
    busy: dict[str, list[float]]


def ratios(times: dict[str, list[float]], side: str, over: str = "plain") -> list[float]:
    """Per round, `side`'s seconds over `over`'s of the same round."""
    return [a / b for a, b in zip(times[side], times[over], strict=True)]


def median_ratio(times: dict[str, list[float]], side: str, over: str = "plain") -> float:
    return statistics.median(ratios(times, side, over))


def rest_s(times: dict[str, list[float]]) -> float:
    """The audit's seconds beyond the exact-kernel floor, median of the rounds: the work that is
    not the measurement of each call (the fold check, set-up, bookkeeping, metrics, verdict)."""
    return statistics.median(a - k for a, k in zip(times["numba"], times["kernel"], strict=True))


@contextlib.contextmanager
def burners(count: int) -> Iterator[list[subprocess.Popen]]:
    """`count` processes that spin on the CPU until the block ends (killed in `finally`)."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", BURN, str(os.getpid())]))
        time.sleep(SETTLE_S)
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@contextlib.contextmanager
def kernel(path: str) -> Iterator[None]:
    """The measurement path for the audits in the block: "" the numba kernel, "torch" the
    torch path; the variable is put back afterwards."""
    before = os.environ.get(KERNEL_ENV)
    if path:
        os.environ[KERNEL_ENV] = path
    else:
        os.environ.pop(KERNEL_ENV, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = before


def rounds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run per round, the order reversed every other round."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for i in range(repeats):
        for k in order if i % 2 == 0 else order[::-1]:
            times[k].append(timed(runs[k]))
    return times


def measure(bench: Any, name: str, shape: tuple[int, ...], batches: int, repeats: int) -> Measured:
    factory = CASES[name][0]
    model = bench.build(factory, shape)
    data = list(bench.batches_of(shape, batches, seed=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def plain() -> None:
        bench.plain_passes(model, data)
        model.load_state_dict(state)  # the unhooked train-mode passes moved the statistics

    def audit(path: str) -> Callable[[], object]:
        def run() -> None:
            with kernel(path):
                bench.run_audit(model, data)

        return run

    def floor() -> None:  # the plain passes with hooks that run the exact kernel alone
        floors.floor_passes(bench, model, data, "kernel")
        model.load_state_dict(state)

    runs = {"plain": plain, "numba": audit(""), "torch": audit("torch")}
    for run in (*runs.values(), floor):  # warm-up: the kernels loaded, the allocator grown
        run()
    quiet = rounds({**runs, "kernel": floor}, repeats)
    with burners(BURNERS):
        busy = rounds(runs, repeats)
    return Measured(name, shape, batches, len(bench.models.bn_layers(model)), quiet, busy)


def run(ctx: Any) -> list[Measured]:
    got = []
    for name, (_, shape, batches, _) in CASES.items():
        if ctx.quick:
            shape, batches = QUICK_SHAPES[name], 1
        ctx.log(f"shapes: {name}")
        got.append(measure(ctx.bench, name, shape, batches, ctx.repeats))
    return got


def section(ctx: Any) -> str:
    """bench.py's section: run, then render."""
    return render(run(ctx), ctx.threads, ctx.repeats)


def _mark(value: float, target: float) -> str:
    return f"**{value:.2f}**" if value > target else f"{value:.2f}"


def render(got: list[Measured], threads: int, repeats: int) -> str:
    rows = []
    for m in got:
        q, b = m.quiet, m.busy
        rows.append(
            [
                m.name,
                f"{m.batches} × {'×'.join(map(str, m.shape))}",
                str(m.layers),
                f"{statistics.median(q['plain']):.3f}",
                _mark(median_ratio(q, "numba"), TARGET_QUIET),
                f"{median_ratio(q, 'kernel'):.2f}",
                f"{1e3 * rest_s(q):.0f}",
                f"{median_ratio(q, 'torch'):.2f}",
                f"{statistics.median(b['plain']):.3f}",
                _mark(median_ratio(b, "numba"), TARGET_BUSY),
                f"{median_ratio(b, 'torch'):.2f}",
                _mark(median_ratio(b, "torch", "numba"), TARGET_FALLBACK),
            ]
        )
    header = [
        "model",
        "batches × shape",
        "BN layers",
        "plain s, quiet",
        "numba / plain, quiet",
        "exact kernel alone / plain, quiet",
        "the rest, ms per audit",
        "torch path / plain, quiet",
        f"plain s, {BURNERS} burners",
        f"numba / plain, {BURNERS} burners",
        f"torch path / plain, {BURNERS} burners",
        f"torch path / numba, {BURNERS} burners",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    quiet_ok = sum(median_ratio(m.quiet, "numba") <= TARGET_QUIET for m in got)
    busy_ok = sum(median_ratio(m.busy, "numba") <= TARGET_BUSY for m in got)
    fallback_ok = sum(median_ratio(m.busy, "torch", "numba") <= TARGET_FALLBACK for m in got)
    what = "; ".join(f"{m.name}: {CASES[m.name][3]}" for m in got)
    return "\n".join(
        [
            "## The shapes users have: both install paths, quiet and under contention",
            "",
            f"`bnaudit.audit` against the plain passes it needs, in one process, torch threads: "
            f"{threads}, interleaved (plain, numba kernel, torch path; reversed every other "
            f"round; the cycle collector off during each run), median of {repeats} per-round "
            "ratios. `numba` is what `pip install "
            "bnaudit` runs; `torch path` is `BNAUDIT_KERNEL=torch`, what runs where numba has "
            f"no wheel (the report then says so in a note). Then the same {repeats} rounds "
            f"while {BURNERS} other processes spin on the CPU (busy loops, started and "
            "stopped by the benchmark), as on a shared CI runner. Calibrated running "
            "statistics (train-mode passes), seeded N(0, 1) batches. Bold: a target missed "
            f"(≤ {TARGET_QUIET} quiet, ≤ {TARGET_BUSY} under contention; the torch path ≤ "
            f"{TARGET_FALLBACK} × the numba kernel under contention).",
            "",
            "\n".join(lines),
            "",
            f"- numba kernel ≤ {TARGET_QUIET} quiet: {quiet_ok} of {len(got)} models; "
            f"≤ {TARGET_BUSY} with {BURNERS} burners: {busy_ok} of {len(got)}",
            f"- torch path ≤ {TARGET_FALLBACK} × the numba kernel with {BURNERS} burners: "
            f"{fallback_ok} of {len(got)}",
            "- where the numba kernel misses its target, two columns say why: `exact kernel "
            "alone` is the plain passes with hooks that run the audit's exact kernel on every "
            "BN call and nothing else (the floor of the measurement itself, interleaved in the "
            "same quiet rounds: `benchmarks/floors.py`); `the rest` is the audit's time beyond "
            "that floor (the fold check, the probes' set-up, the train-mode update undone, the "
            "kept rows, the metrics and the verdict), which does not grow with the batch, so "
            "it weighs most on a small forward; docs/performance.md has their profiles. The "
            "torch path's floor is about 18 float64 passes over each value against the "
            "kernel's two reads (docs/performance.md, \"The default install, quiet and under "
            'load")',
            f"- models: {what}",
            "",
        ]
    )
