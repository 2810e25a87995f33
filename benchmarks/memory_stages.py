"""Where an audit's peak memory goes, stage by stage, in one fresh process (`bench.py` imports
this module; `python benchmarks/bench.py --memory-only --models NAME` runs only this part).

Each stage's peak is VmHWM since the stage began: writing "5" to /proc/self/clear_refs (Linux
≥ 4.0) sets VmHWM back to the current RSS. RSS is split into anonymous memory (the heap: torch's
tensors, Python's objects, LLVM's data) and file-backed pages (the code of the shared libraries:
torch's, and LLVM's under numba), which are clean copies of files.

The stages, in the order an audit meets them: the model loaded (its peak includes
`load_state_dict`, which holds the checkpoint's tensors beside the model's); numba's kernels
loaded and run once each (`bench.warm_kernels`; an audit does both at its first BN calls); the
audit's own passes with the metrics and fold checks (until the first output-impact batch); the
output-impact passes; the report (after `bnaudit.audit` returns).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

STATUS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status() -> dict[str, float]:
    """This process's RSS counters, in MiB."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS:
            got[key] = int(value.split()[0]) / 1024
    return got


def reset_peak() -> bool:
    """VmHWM := VmRSS; False where the kernel cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Stages:
    """The stages met so far: name, peak during it, and RSS, anonymous and file MiB at its end."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.resets = reset_peak()

    def mark(self, name: str) -> None:
        s = status()
        self.rows.append(
            {
                "stage": name,
                "peak": s["VmHWM"],
                "rss": s["VmRSS"],
                "anon": s["RssAnon"],
                "file": s["RssFile"],
            }
        )
        self.resets = reset_peak() and self.resets


def child_stages(bench: ModuleType, factory: str, ckpt: str, shape: str, count: str) -> None:
    """`bench.py _stages`: the stages of one audit, as JSON on stdout."""
    import torch

    stages = Stages()
    model = getattr(bench.models, factory)()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model.eval()
    stages.mark("model loaded")
    import bnaudit

    bench.warm_kernels()
    stages.mark("numba kernels loaded")
    dims = tuple(int(d) for d in shape.split("x"))

    class Loader:  # as bench.child_rss: re-iterable, each batch made when asked for
        def __iter__(self) -> Iterator[Any]:
            return bench.batches_of(dims, int(count), seed=2)

    def progress(done: int, total: int | None, stage: str) -> None:
        if stage != "audit" and stages.rows[-1]["stage"] == "numba kernels loaded":
            stages.mark("audit passes, metrics, folds")

    bnaudit.audit(model, Loader(), progress=progress)
    if stages.rows[-1]["stage"] == "numba kernels loaded":  # no impact pass ticked
        stages.mark("audit passes, metrics, folds")
    else:
        stages.mark("output-impact passes")
    print(json.dumps({"stages": stages.rows, "resets": stages.resets}))


def measure(bench: ModuleType, case: Any, folder: Path, env: dict[str, str]) -> dict[str, Any]:
    """The stages of one audit of `case` in a fresh process."""
    cmd = [sys.executable, str(Path(bench.__file__).resolve()), "_stages", case.factory]
    cmd += [str(folder / f"{case.name}.pt"), "x".join(map(str, case.shape)), str(case.batches)]
    return json.loads(bench.run_child(cmd, env)[1])


def render(bench: ModuleType, cases: tuple[Any, ...], got: dict[str, dict[str, Any]]) -> list[str]:
    """The RESULTS.md section: per model, each stage's peak and where its RSS is."""
    rows = []
    for c in cases:
        before = None
        for s in got[c.name]["stages"]:
            grew = "" if before is None else f"{s['rss'] - before:+.0f}"
            rows.append(
                [
                    c.name,
                    s["stage"],
                    f"{s['peak']:.0f}",
                    f"{s['rss']:.0f}",
                    grew,
                    f"{s['anon']:.0f}",
                    f"{s['file']:.0f}",
                ]
            )
            before = s["rss"]
    exact = all(g["resets"] for g in got.values())
    return [
        "## Peak memory, stage by stage (one audit per model, a fresh process)",
        "",
        "Peak: VmHWM during the stage"
        + ("" if exact else " (not reset between stages here: the peak so far)")
        + ". RSS, anonymous and file-backed: at the stage's end (MiB). numba's kernels are "
        "loaded and run once on small tensors before the audit, so that their cost (LLVM's "
        "code, and its heap when it links each kernel at its first call) shows apart; the "
        "audit itself does both at its first BN calls. docs/performance.md says what each part is.",
        "",
        bench.table(
            ["model", "stage", "peak MiB", "RSS MiB", "RSS change", "anon MiB", "file MiB"], rows
        ),
        "",
    ]
