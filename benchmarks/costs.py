"""The benchmark's other costs: recalibration against update_bn, many tiny batches, and the
first run with a cold kernel cache. Used by bench.py, which renders them into RESULTS.md.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import floors
import torch
from torch.optim.swa_utils import update_bn

HERE = Path(__file__).resolve().parent

RECAL_FACTORY = "mobilenetv2_like"
RECAL_SHAPE = (16, 3, 64, 64)
RECAL_BATCHES = 8
TARGET_RECAL = 1.2  # recalibrate statistics / update_bn

TINY_FACTORY = "small_cnn"
TINY_SHAPE = (8, 3, 16, 16)
TINY_BATCHES = 1000  # 2,000 before issue 25: make bench now fits 20 minutes


def recalibration(
    bench: Any, folder: Path, env: dict[str, str], repeats: int, quick: bool
) -> dict[str, Any]:
    """`bnaudit.recalibrate.recalibrate` against `update_bn` on the same model and batches, in one
    process (interleaved) and as whole processes (`recalibrate --no-verify`, `--verify`)."""
    shape = (4, 3, 32, 32) if quick else RECAL_SHAPE
    count = 2 if quick else RECAL_BATCHES
    model = bench.build(RECAL_FACTORY, shape)
    batches = list(bench.batches_of(shape, count, seed=3))
    state = copy.deepcopy(model.state_dict())
    from bnaudit.recalibrate.recalibration import recalibrate

    def floor() -> None:
        with floors.moments_hooked(model):
            update_bn(batches, model)

    # update_bn writes the statistics into the model: put back after each of its runs.
    swa, exact, ours = bench.interleaved(
        [lambda: update_bn(batches, model), floor, lambda: recalibrate(model, batches)],
        repeats,
        reset=lambda: model.load_state_dict(state),
        resets=2,
    )
    ckpt, data = folder / "recal.pt", folder / "recal-data.pt"
    torch.save(state, ckpt)
    torch.save(batches, data)
    spec = f"{HERE / 'models.py'}:{RECAL_FACTORY}"
    base = [sys.executable, "-m", "bnaudit", "recalibrate", str(ckpt), "--model", spec]
    base += ["--data", str(data), "--force", "-o", str(folder / "recal-out.pt")]
    swa_cmd = [sys.executable, str(HERE / "bench.py"), "_update_bn", RECAL_FACTORY]
    commands = {
        "update_bn": [*swa_cmd, str(ckpt), str(data), str(folder / "swa-out.pt")],
        "--no-verify": [*base, "--no-verify"],
        "--verify": [*base, "--verify"],
    }
    procs: dict[str, list[float]] = {k: [] for k in commands}
    for i in range(max(1, repeats // 2)):
        order = list(commands) if i % 2 == 0 else list(commands)[::-1]
        for k in order:
            procs[k].append(_child_seconds(bench, commands[k], env))
    return {
        "shape": shape,
        "batches": count,
        "swa": swa,
        "exact": exact,
        "ours": ours,
        "procs": procs,
    }


def tiny_batches(bench: Any, repeats: int, quick: bool) -> dict[str, Any]:
    """The per-batch fixed cost: many tiny batches of a small model, audit against plain, with
    the measured floors (`floors`: empty hooks, a read of x and y, the exact kernel alone)."""
    count = 50 if quick else TINY_BATCHES
    model = bench.build(TINY_FACTORY, TINY_SHAPE)
    batches = list(bench.batches_of(TINY_SHAPE, count, seed=2))
    r = bench.time_in_process(model, batches, max(3, repeats // 2), with_floors=True)
    return {"batches": count, "timing": r.timing, "hooked": r.hooked, "inproc": r}


def cold_cache(bench: Any, folder: Path, env: dict[str, str]) -> dict[str, float]:
    """`bnaudit check` of the small model with an empty kernel cache, then with it filled."""
    model = bench.build(TINY_FACTORY, TINY_SHAPE)
    ckpt, data = folder / "tiny.pt", folder / "tiny-data.pt"
    torch.save(model.state_dict(), ckpt)
    torch.save(list(bench.batches_of(TINY_SHAPE, 4, seed=2)), data)
    spec = f"{HERE / 'models.py'}:{TINY_FACTORY}"
    cmd = [sys.executable, "-m", "bnaudit", "check", str(ckpt), "--model", spec]
    cmd += ["--data", str(data), "--fail-on", "never"]
    with tempfile.TemporaryDirectory(prefix="bnaudit-numba-") as cache:
        env = dict(env, NUMBA_CACHE_DIR=cache)
        cold = _child_seconds(bench, cmd, env)
        warm = [_child_seconds(bench, cmd, env) for _ in range(3)]
    off = [_child_seconds(bench, cmd, dict(env, BNAUDIT_KERNEL="torch")) for _ in range(3)]
    return {"cold": cold, "warm": statistics.median(warm), "off": statistics.median(off)}


def _child_seconds(bench: Any, cmd: list[str], env: dict[str, str]) -> float:
    return bench.run_child(cmd, env)[0]


def child_update_bn(factory: str, ckpt: str, data: str, out: str) -> None:
    """What update_bn needs in a process of its own: load, one pass per batch, save."""
    import models

    model = getattr(models, factory)()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    update_bn(torch.load(data, weights_only=True), model)
    tmp = f"{out}.tmp{os.getpid()}"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out)


def render(recal: dict[str, Any], tiny: dict[str, Any], cold: dict[str, float], met: Callable,
           table: Callable, target_time: float) -> list[str]:  # fmt: skip
    """The RESULTS.md sections for these measurements."""
    swa, ours = statistics.median(recal["swa"]), statistics.median(recal["ours"])
    ratios = [o / s for s, o in zip(recal["swa"], recal["ours"], strict=True)]
    floor = statistics.median(e / s for s, e in zip(recal["swa"], recal["exact"], strict=True))
    procs = {k: statistics.median(v) for k, v in recal["procs"].items()}
    dims = "×".join(map(str, recal["shape"]))
    t = tiny["timing"]
    plain, hooked = statistics.median(t.plain), statistics.median(tiny["hooked"])
    return [
        "## Recalibration against update_bn",
        "",
        f"`bnaudit.recalibrate.recalibrate(model, batches)` (train regime: one pass per batch, "
        f"only the BN layers in train mode, statistics only) against "
        f"`torch.optim.swa_utils.update_bn` on the same {RECAL_FACTORY} and "
        f"{recal['batches']} batches of {dims}, interleaved in one process; then whole "
        f"processes: a script that loads the files, runs update_bn and "
        f"saves, against `bnaudit recalibrate --no-verify` and `--verify` (the default: an "
        f"audit before and after, counted separately).",
        "",
        "The floor: update_bn with the exact float64 moments of every BN input computed as "
        "recalibrate computes them (`floors.moments_hooked`: a pre-hook running the moments "
        "kernel), in the same rounds.",
        "",
        table(
            [
                "update_bn s",
                "floor: update_bn + exact moments / update_bn",
                "recalibrate s",
                "recalibrate / update_bn",
                "range",
                "target",
            ],
            [
                [
                    f"{swa:.3f}",
                    f"{floor:.2f}",
                    f"{ours:.3f}",
                    f"**{ours / swa:.2f}**",
                    f"{min(ratios):.2f}–{max(ratios):.2f}",
                    met(ours / swa, TARGET_RECAL),
                ]
            ],
        ),
        "",
        table(
            ["process", "s", "/ update_bn process"],
            [[f"`{k}`", f"{v:.2f}", f"{v / procs['update_bn']:.2f}"] for k, v in procs.items()],
        ),
        "",
        "## Many tiny batches (the per-batch fixed cost)",
        "",
        f"`bnaudit.audit` on {tiny['batches']} batches of {'×'.join(map(str, TINY_SHAPE))} "
        f"of a small CNN (3 × conv → BatchNorm2d → ReLU, a BatchNorm1d head) against the same "
        "plain passes, in one process, interleaved, with the measured floors of the section "
        'above ("Where the ratio goes").',
        "",
        table(
            ["plain passes s", "hooked passes s", "audit s", "audit / plain", "range", "target"],
            [
                [
                    f"{plain:.2f}",
                    f"{hooked:.2f}",
                    *t.cells()[1:],
                    met(t.ratio, target_time),
                ]
            ],
        ),
        "",
        table(floors.HEADER, [floors.row("small CNN, tiny batches", tiny["inproc"])]),
        "",
        "## First run: a cold kernel cache",
        "",
        "`bnaudit check` of the small CNN (4 batches) as a whole process with an empty "
        "`NUMBA_CACHE_DIR` (numba compiles the kernels), then with the cache filled (median of "
        "3), and with the kernels off (`BNAUDIT_KERNEL=torch`, no numba import). A fresh CI "
        "runner pays the compilation once per job; keeping `~/.cache/bnaudit/numba` (or "
        "`$NUMBA_CACHE_DIR`) between jobs, e.g. with `actions/cache`, avoids it "
        "(docs/cost.md, docs/github-actions.yml).",
        "",
        table(
            ["cold cache s", "warm cache s", "compilation s", "kernels off s"],
            [
                [
                    f"{cold['cold']:.2f}",
                    f"{cold['warm']:.2f}",
                    f"**{cold['cold'] - cold['warm']:.2f}**",
                    f"{cold['off']:.2f}",
                ]
            ],
        ),
        "",
    ]
