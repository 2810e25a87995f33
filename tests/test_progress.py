"""Progress covers every pass over the batches, each under its stage's name: the audit, the
output-impact passes and, with labels, the task-metric passes; the line fits the terminal."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bnaudit.check.audit import audit
from bnaudit.measure.progress import Ticking
from bnaudit.recalibrate.recalibration import recalibrate
from bnaudit.report.terminal import Progress
from tests import labelled
from tests.terminal import ANSI, run_on_pty

ROOT = Path(labelled.__file__).resolve().parent.parent
BATCHES = 6  # halves of 3 for the cross-fitted task metric


class Recorder:
    """The progress calls, each with the forward passes the model had run by then."""

    def __init__(self, model: nn.Module) -> None:
        self.forwards = 0
        self.ticks: list[tuple[int, int | None, str, int]] = []
        model.register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.forwards += 1

    def __call__(self, done: int, total: int | None, stage: str) -> None:
        self.ticks.append((done, total, stage, self.forwards))


def passes(ticks: list[tuple[int, int | None, str, int]]) -> list[tuple[str, int, int]]:
    """(stage, batches ticked, total) per pass; a pass is a run of done = 1, 2, ..."""
    runs: list[tuple[str, int, int]] = []
    for done, total, stage, _ in ticks:
        assert total is not None
        if done == 1:
            runs.append((stage, 0, total))
        name, count, of = runs[-1]
        assert (name, count + 1) == (stage, done), ticks  # consecutive, within one stage
        runs[-1] = (name, done, of)
    return runs


@pytest.mark.parametrize("regime", ["train", "eval"])
def test_every_pass_ticks_under_its_stage(regime: str) -> None:
    torch.manual_seed(0)
    model = labelled.build().eval()
    batches = list(labelled.loader(BATCHES * labelled.BATCH))
    rec = Recorder(model)
    report = audit(model, batches, progress=rec, regime=regime)
    assert report.impact is not None and report.impact.evidence is not None  # labels measured

    runs = passes(rec.ticks)
    assert all(count == total for _, count, total in runs), runs  # every pass ran to its end
    stages = [stage for stage, _, _ in runs]
    fit = ["task metric, fit half 1"], ["task metric, fit half 2"]
    if regime == "eval":  # level by level: a pass per BN depth, numbered
        fit = tuple([s for s in stages if s.startswith(f"task metric, fit half {h}, pass ")]
                    for h in (1, 2))  # fmt: skip
        assert all(f[0].endswith("pass 1") and len(f) >= 2 for f in fit), stages
    impact = [s for s in stages if s.startswith("output impact, pass ")]
    assert impact == [f"output impact, pass {k}" for k in range(1, len(impact) + 1)]
    # train regime: the output comparison alone; eval: a recalibration pass per level before it
    assert len(impact) == 1 if regime == "train" else len(impact) >= 3
    assert stages == [
        "audit",
        *impact,
        "task metric, stored stats",
        *fit[0],
        "task metric, score half 2",
        *fit[1],
        "task metric, score half 1",
    ]
    totals = {stage: total for stage, _, total in runs}
    assert totals["audit"] == totals["task metric, stored stats"] == BATCHES
    assert totals["task metric, score half 1"] == totals[fit[0][0]] == BATCHES // 2

    # No pass runs untracked: at most the audit's two forwards (eval, train) between two ticks,
    # none after the last one, and a forward behind every tick but the stored outputs' reuse.
    before = 0
    for done, _, stage, forwards in rec.ticks:
        assert forwards - before <= 2, (stage, done)
        assert forwards > before or stage == "task metric, stored stats", (stage, done)
        before = forwards
    assert rec.forwards == before == report.forward_passes


def test_a_ticking_view_replays_its_batches_each_pass() -> None:
    seen: list[tuple[int, int | None, str]] = []
    view = Ticking(["a", "b"], 2, lambda *call: seen.append(call), lambda k: f"stage {k}")
    assert len(view) == 2 and list(view) == ["a", "b"] and list(view) == ["a", "b"]
    assert seen == [(1, 2, "stage 1"), (2, 2, "stage 1"), (1, 2, "stage 2"), (2, 2, "stage 2")]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("width", [100, 80, 60, 40, 20])
def test_the_line_stays_narrower_than_the_terminal(width: int) -> None:
    stream = _Tty()
    bar = Progress(stream, delay=0.0, clock=iter(range(0, 10_000, 7)).__next__, width=width)
    for done in range(1, 4):
        bar(done, 3, "task metric, fit half 1, pass 12")
    bar(1, None, "audit")
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 4
    for frame in frames:
        line = ANSI.sub("", frame)
        assert 0 < len(line) < width, line  # the last column would wrap
    shown = ANSI.sub("", frames[2])
    if width >= 100:  # room for the bar, full at the end of the pass
        assert re.fullmatch(r"bnaudit: \[#{8,20}\] task metric, fit half 1, pass 12 3/3 "
                            r"batches, \d:\d\d, ETA 0:00", shown), shown  # fmt: skip
    elif width >= 80:  # the bar gives way first, the words stay whole
        assert shown.startswith("bnaudit: task metric, fit half 1, pass 12 3/3 batches")
    else:
        assert shown.endswith("…") and shown.startswith("bnaudit: task")


SLOW = """
import time
from tests import labelled


def build():
    net = labelled.build()
    # every forward takes a while: the bar shows after its 0.5 s delay
    net.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    return net
"""


def test_the_bar_on_a_pty_covers_the_task_metric_passes(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    ckpt = tmp_path / "m.pt"
    torch.save(labelled.trained(frozen_stats=False).state_dict(), ckpt)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "bnaudit", "check", str(ckpt), "--model",
           f"{tmp_path}/slow.py:build", "--data", f"{ROOT}/tests/labelled.py:loader"]  # fmt: skip
    frames, out = run_on_pty(cmd, env, tmp_path)
    bars = [f for f in frames if f.startswith("bnaudit: [")]
    assert bars and all(len(f) < 80 for f in bars), bars  # COLUMNS=80: no frame wraps
    # the loader's 16 batches: halves of 8; each stage seen at its end
    for stage, total in [
        ("audit", 16),
        ("output impact, pass 1", 16),
        ("task metric, stored stats", 16),
        ("task metric, fit half 1", 8),
        ("task metric, score half 2", 8),
        ("task metric, fit half 2", 8),
        ("task metric, score half 1", 8),
    ]:
        assert any(f"] {stage} {total}/{total} batches, " in f for f in bars), (stage, bars)
    assert frames[-1] == ""  # cleared before the table is printed
    assert out.decode().splitlines()[-1].startswith("PASS")


@pytest.mark.parametrize("regime", ["train", "eval"])
def test_recalibration_ticks_each_of_its_passes(regime: str) -> None:
    torch.manual_seed(0)
    model = labelled.build().eval()
    rec = Recorder(model)
    r = recalibrate(model, labelled.loader(BATCHES * labelled.BATCH), regime=regime, progress=rec)
    runs = passes(rec.ticks)
    assert all(count == total == BATCHES for _, count, total in runs), runs
    if regime == "train":  # one statistics pass, the batches streamed
        assert [stage for stage, _, _ in runs] == ["recalibrate"]
    else:  # a pass per BN depth, then one that confirms nothing moves
        assert [s for s, _, _ in runs] == [
            f"recalibrate, level {k}" for k in range(1, len(runs) + 1)
        ]
        assert len(runs) >= 3
    assert rec.forwards == r.forward_passes == BATCHES * len(runs)


def test_the_bar_on_a_pty_covers_recalibrate_and_its_audits(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW)
    ckpt = tmp_path / "m.pt"
    torch.save(labelled.trained(frozen_stats=False).state_dict(), ckpt)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100", "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "bnaudit", "recalibrate", str(ckpt), "-o", tmp_path / "new.pt",
           "--model", f"{tmp_path}/slow.py:build", "--data", f"{ROOT}/tests/labelled.py:loader",
           "--force"]  # fmt: skip
    frames, _ = run_on_pty(cmd, env, tmp_path)
    bars = [f for f in frames if f.startswith("bnaudit: [")]
    for stage in ("before: audit", "before: output impact, pass 1", "recalibrate", "after: audit"):
        assert any(f"] {stage} 16/16 batches, " in f for f in bars), (stage, bars)
    # the log line in the middle clears the bar first: on a line of its own
    assert any(f.startswith("bnaudit: wrote ") for f in frames), frames
    assert not any("batches, " in f and "wrote" in f for f in frames), frames
    assert frames[-1] == ""  # cleared before the changes are printed
