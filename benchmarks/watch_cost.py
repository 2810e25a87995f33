"""What `bnaudit.watch` costs a training step: one step (forward, cross-entropy, backward, SGD
step) on the ResNet-50-layout model, without the watcher, with it at every step, and with
`every=N`.

    python benchmarks/watch_cost.py [--quick] [--repeats R] [--threads N]

Three copies of one model, each with its own optimizer, take one step each in turn (plain,
watched, idle; the order reversed every round), so that drift in the machine's speed hits each
side alike; each ratio compares the steps of one round. The watched copies keep their watchers
for the whole run, as a training loop would. The idle copy's watcher watches its first step
only: its steps are what an unwatched step costs under `every=N`, whose cost over N steps is
then (one watched step + N - 1 idle ones) / N.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models

import bnaudit

TARGET = 1.10  # a watched step / a plain step (issue 26)
SHAPE = (16, 3, 112, 112)  # as bench.py's resnet50 case
QUICK_SHAPE = (2, 3, 32, 32)
EVERY = 10  # the every=N reported
IDLE = 10**9  # every=IDLE: after the warm-up, no step of the idle copy is watched


def measure(
    shape: tuple[int, ...], repeats: int, factory: Callable[[], nn.Module] = models.resnet50_like
) -> dict[str, list[float]]:
    """Seconds per step of each side, `repeats` rounds (after one warm-up round)."""
    torch.manual_seed(0)
    base = factory()
    x = torch.randn(*shape)
    with torch.no_grad():
        classes = base.eval()(x).shape[1]
    base.train()
    copies = [copy.deepcopy(base) for _ in range(3)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in copies]
    watchers = [
        bnaudit.watch(copies[1], optimizers[1]),
        bnaudit.watch(copies[2], optimizers[2], every=IDLE),
    ]
    y = torch.randint(0, classes, (shape[0],))

    def step(i: int) -> float:
        start = time.perf_counter()
        optimizers[i].zero_grad()
        F.cross_entropy(copies[i](x), y).backward()
        optimizers[i].step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"plain": [], "watched": [], "idle": []}
    names = list(times)
    try:
        for i in range(3):
            step(i)  # warm-up (the idle copy's one watched step)
        for r in range(repeats):
            for i in [0, 1, 2] if r % 2 == 0 else [2, 1, 0]:
                times[names[i]].append(step(i))
    finally:
        for w in watchers:
            w.close()
    findings = [f.code for w in watchers for f in w.report().findings]
    if findings:  # a healthy loop: a finding here is a bug in the watcher
        raise RuntimeError(f"the watcher found {findings} in a healthy loop")
    return times


def section(quick: bool = False, repeats: int = 5) -> str:
    """The RESULTS.md section (markdown)."""
    shape = QUICK_SHAPE if quick else SHAPE
    t = measure(shape, max(1, repeats))
    watched = [w / p for p, w in zip(t["plain"], t["watched"], strict=True)]
    idle = [i / p for p, i in zip(t["plain"], t["idle"], strict=True)]
    every = [(w + (EVERY - 1) * i) / EVERY for w, i in zip(watched, idle, strict=True)]
    plain_ms = 1000 * statistics.median(t["plain"])
    verdict = "meets" if statistics.median(watched) <= TARGET else "MISSES"
    dims = "×".join(map(str, shape))
    return "\n".join(
        [
            "## Watching a training loop (bnaudit.watch)",
            "",
            f"One training step (forward, cross-entropy, backward, SGD step) of the ResNet-50 "
            f"layout (53 BatchNorm2d) on a batch of {dims}, {torch.get_num_threads()} threads: "
            f"without the watcher, with `bnaudit.watch(model, optimizer)`, and with "
            f"`every={EVERY}`. Three copies of the model step in turn, one step each per round, "
            f"{len(watched)} rounds; the ratios are per round, medians (min-max). An unwatched "
            f"step under `every` keeps the hooks, switched off; every={EVERY} costs one watched "
            f"and {EVERY - 1} unwatched steps per {EVERY}.",
            "",
            "| side | ms per step | ratio to plain |",
            "| --- | --- | --- |",
            f"| plain step | {plain_ms:.0f} | 1 |",
            f"| watched, every step | {1000 * statistics.median(t['watched']):.0f} | "
            f"{_spread(watched)} |",
            f"| unwatched step under every=N | {1000 * statistics.median(t['idle']):.0f} | "
            f"{_spread(idle)} |",
            f"| every={EVERY}, per step over {EVERY} steps | - | {_spread(every)} |",
            "",
            f"Target: a watched step at most {TARGET}x a plain one: {verdict} it.",
            "",
        ]
    )


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny batches: a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(section(args.quick, args.repeats))


if __name__ == "__main__":
    main()
