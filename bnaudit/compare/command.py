"""`bnaudit diff` as a library call: load both checkpoints, compare, judge, write the reports.

Everything `check` offers that applies to two checkpoints and no data applies the same way:
the safe loader (`--trust` rules, every format and container, `--key`), `--model`, the
[tool.bnaudit] settings, ignores and baselines, and the report files (atomic, never over an
input). Settings about data and thresholds of `check` do not enter a diff.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bnaudit.check.run import refuse_clashes
from bnaudit.checkpoint.into_model import load_into
from bnaudit.checkpoint.loading import Checkpoint, load_checkpoint
from bnaudit.compare.changes import DiffReport, diff
from bnaudit.compare.render import render_csv, render_html, render_json, render_markdown
from bnaudit.gate.baseline import from_report, read_baseline, render_baseline
from bnaudit.gate.config import CheckSettings
from bnaudit.gate.decision import judge
from bnaudit.inputs.registry import build_model
from bnaudit.report.render import write_atomic


@dataclass(frozen=True)
class DiffSettings:
    """What `diff` takes beyond `check`'s settings (whose checkpoint is BASE)."""

    new: Path
    key_new: str | None = None  # None: the same --key as BASE
    only_changed: bool = False


Renderer = Callable[[DiffReport, bool], str]


def report_files(s: CheckSettings) -> list[tuple[str, Path, Renderer]]:
    files: list[tuple[str, Path | None, Renderer]] = [
        ("--markdown", s.markdown, render_markdown),
        ("--csv", s.csv, render_csv),
        ("--json", s.json, render_json),
        ("--html", s.html, render_html),
    ]
    return [(option, path, render) for option, path, render in files if path is not None]


def check_outputs(s: CheckSettings, d: DiffSettings) -> None:
    """Refuse, before loading, a report over an input, in a missing folder, or given twice."""
    inputs = [s.checkpoint, d.new, *([s.config_file] if s.config_file else [])]
    if s.model and ":" in s.model and Path(s.model.rpartition(":")[0]).is_file():
        inputs.append(Path(s.model.rpartition(":")[0]))
    refuse_clashes([(option, path) for option, path, _ in report_files(s)], inputs, s)


def run_diff(s: CheckSettings, d: DiffSettings, log: Any = None) -> DiffReport:
    """Everything `bnaudit diff` does before rendering; raises BnauditError subclasses."""
    check_outputs(s, d)
    baseline = read_baseline(s.baseline) if s.baseline and not s.write_baseline else None
    base = load_checkpoint(s.checkpoint, trust=s.trust, key=s.key)
    new = load_checkpoint(d.new, trust=s.trust, key=d.key_new if d.key_new else s.key)
    base_sd, new_sd = _state_dict(base), _state_dict(new)
    model = _model(s, base, base_sd)
    _log(log, f"comparing {s.checkpoint} ({base.source}) with {d.new} ({new.source})")
    report = diff(base_sd, new_sd, model, fail_on=s.fail_on)
    notes = [
        *(f"{'BASE and NEW' if n in new.notes else 'BASE'}: {n}" for n in base.notes),
        *(f"NEW: {n}" for n in new.notes if n not in base.notes),
    ]
    report = dataclasses.replace(
        report,
        notes=(*notes, *report.notes),
        base=str(s.checkpoint),
        new=str(d.new),
        base_sha256=base.sha256,
        new_sha256=new.sha256,
    )
    return judge(report, s, baseline)  # type: ignore[arg-type,return-value]  # same conventions


def _state_dict(ckpt: Checkpoint) -> dict[str, Any]:
    """The checkpoint's state dict, its CRCs checked: the comparison reads every tensor."""
    sd = ckpt.state_dict if ckpt.state_dict is not None else None
    if sd is None:
        assert ckpt.module is not None  # a checkpoint holds a module or a state dict
        sd = ckpt.module.state_dict()
    ckpt.verify(sd)
    return dict(sd)


def _model(s: CheckSettings, base: Checkpoint, base_sd: dict[str, Any]) -> nn.Module | None:
    """The architecture for the dataflow: --model (BASE must fit it), or a pickled module."""
    if s.model is None:
        return base.module
    model = build_model(s.model)
    load_into(model, base_sd, s.checkpoint)  # BASE fits the architecture, or a clear error
    return model


def write_reports(report: DiffReport, s: CheckSettings, d: DiffSettings) -> list[Path]:
    written = []
    for _, path, render in report_files(s):
        write_atomic(path, render(report, d.only_changed))
        written.append(path)
    if s.write_baseline:
        write_atomic(s.write_baseline, render_baseline(from_report(report)))  # type: ignore[arg-type]
        written.append(s.write_baseline)
    return written


def _log(log: Any, text: str) -> None:
    if log is not None:
        print(f"bnaudit: {text}", file=log)
