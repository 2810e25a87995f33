"""The process settings an audit holds (`bnaudit.core.runtime`) and gives back: a model whose BN
calls are all small runs the passes after the first on one torch thread
(`bnaudit.measure.passes.SMALL_CALL_VALUES`), a model with a large call keeps the caller's count
throughout; the objects older than the audit are frozen for the cycle collector while it runs."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import bnaudit
from bnaudit.core.errors import DataError
from bnaudit.measure.passes import SMALL_CALL_VALUES


def threads_seen(model: nn.Module, batches: list[torch.Tensor]) -> list[int]:
    """torch's thread count at every BN call of an audit, in order."""
    seen: list[int] = []
    hooks = [
        m.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm1d)
    ]
    try:
        bnaudit.audit(model, batches)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("width", [16, SMALL_CALL_VALUES // 8])
def test_only_small_calls_narrow_the_threads_after_the_first_pass(width: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 3)
    )
    batches = [torch.randn(8, 8) for _ in range(3)]  # 8 × width values per BN call
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = threads_seen(model, batches)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert after == 2
    assert seen[0] == 2  # the first pass decides
    small = 8 * width < SMALL_CALL_VALUES
    assert set(seen[1:]) == ({1} if small else {2}), (width, seen)


def test_a_failed_audit_gives_the_threads_back() -> None:
    class Breaks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.calls = nn.BatchNorm1d(4), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:  # batch 2's eval pass, after the narrowing
                raise RuntimeError("boom")
            return self.bn(x)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(DataError):
            bnaudit.audit(Breaks(), [torch.randn(8, 4) for _ in range(3)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_audit_freezes_older_objects_while_it_runs_and_unfreezes_them() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    frozen: list[int] = []
    model[1].register_forward_hook(lambda *_: frozen.append(gc.get_freeze_count()))
    assert gc.get_freeze_count() == 0
    bnaudit.audit(model, [torch.randn(8, 4) for _ in range(2)])
    assert min(frozen) > 0  # the model, at least, was frozen during the passes
    assert gc.get_freeze_count() == 0


def test_a_caller_who_froze_objects_keeps_them_frozen() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        bnaudit.audit(model, [torch.randn(8, 4) for _ in range(2)])
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()


def test_the_machine_is_busy_with_more_runnable_tasks_than_cores(tmp_path) -> None:
    from bnaudit.core import runtime

    cores = runtime._cores()
    loadavg = tmp_path / "loadavg"
    for running, busy in ((1, False), (cores, False), (cores + 1, True), (cores + 5, True)):
        loadavg.write_text(f"0.52 0.61 0.70 {running}/812 4242\n")
        assert runtime.busy_in(str(loadavg)) is busy, running
    loadavg.write_text("garbage\n")
    assert runtime.busy_in(str(loadavg))  # unreadable: one thread, the safe choice
    assert runtime.busy_in(str(tmp_path / "absent"))
