"""`bnaudit check` as a library call: load, audit, judge the gate, write the reports.

The gate judges the audit in two steps: ignore entries of the configuration first (those
findings are accepted for good, with their reason), then the baseline (findings accepted as
they were measured when it was written).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnaudit.audit import AuditOptions, audit
from bnaudit.baseline import Baseline, apply_baseline, from_report, read_baseline, render_baseline
from bnaudit.batches import load_batches, parse_shape, synthetic_batches
from bnaudit.config import CheckSettings
from bnaudit.errors import BnauditError, ModelError, ReportError
from bnaudit.html import render_html
from bnaudit.ignores import apply_ignores
from bnaudit.junit import render_junit
from bnaudit.loading import Checkpoint, build_model, load_checkpoint, load_into
from bnaudit.report import Format, check_writable, render, write_atomic
from bnaudit.results import AuditReport

SYNTHETIC_BATCHES = 4  # synthetic batches when --batches is not given


Renderer = Callable[[AuditReport], str]


def report_files(s: CheckSettings) -> list[tuple[str, Path, Renderer]]:
    """Every report file the settings ask for: (option, path, renderer)."""
    files: list[tuple[str, Path | None, Renderer]] = [
        ("--markdown", s.markdown, lambda r: render(r, Format.MARKDOWN)),
        ("--csv", s.csv, lambda r: render(r, Format.CSV)),
        ("--json", s.json, lambda r: render(r, Format.JSON)),
        ("--html", s.html, render_html),
        ("--junit", s.junit, render_junit),
    ]
    return [(option, path, renderer) for option, path, renderer in files if path is not None]


def check_outputs(s: CheckSettings) -> None:
    """Refuse, before the audit, an output over an input, in a missing folder, or given twice."""
    inputs = [s.checkpoint, *_input_files(s)]
    outputs = [(option, path) for option, path, _ in report_files(s)]
    for _, path in outputs:
        check_writable(path, [*inputs, *([s.baseline] if s.baseline else [])])
    if s.write_baseline:
        # Writing the baseline over the one read is how it is updated: allowed.
        check_writable(s.write_baseline, inputs)
        outputs.append(("--write-baseline", s.write_baseline))
    seen: dict[Path, str] = {}
    for option, path in outputs:
        key = path.resolve()
        if key in seen:
            raise ReportError(f"{path}: given to both {seen[key]} and {option}; use two files")
        seen[key] = option


@dataclass(frozen=True)
class Prepared:
    """What an audit runs on: the checkpoint, the model it was loaded into, the batches."""

    checkpoint: Checkpoint
    model: nn.Module
    batches: Iterable[Any]
    synthetic: bool


def prepare(s: CheckSettings, log: Any = None) -> Prepared:
    """Load the checkpoint into the model on its device and open the batches."""
    device = _device(s.device)
    torch.manual_seed(s.seed)
    ckpt = load_checkpoint(s.checkpoint, trust=s.trust)
    model = _model(s, ckpt)
    model.to(device)
    batches, synthetic = _batches(s)
    _log(log, f"auditing {s.checkpoint} ({ckpt.source}) on {device}")
    return Prepared(ckpt, model, batches, synthetic)


def audit_options(s: CheckSettings, p: Prepared, layers: tuple[str, ...] | None = None):
    return AuditOptions(
        thresholds=s.thresholds,
        train_mode=s.train_mode.value,
        fail_on=s.fail_on,
        max_batches=s.batches,
        synthetic_data=p.synthetic,
        layers=layers,
    )


def run_check(
    s: CheckSettings,
    log: Any = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> AuditReport:
    """Everything `bnaudit check` does before rendering; raises BnauditError subclasses.

    The report comes back judged: ignores applied, then the baseline (written first when
    `write_baseline` is set, so that the run is judged against what it wrote). `progress`, when
    given, is called after each batch with the batches done and the total (None if unknown).
    """
    check_outputs(s)  # fail before the audit, not after it
    # A broken baseline fails before the audit too.
    baseline = read_baseline(s.baseline) if s.baseline and not s.write_baseline else None
    p = prepare(s, log)
    report = audit(
        p.model,
        p.batches,
        options=audit_options(s, p),
        checkpoint=str(s.checkpoint),
        sha256=p.checkpoint.sha256,
        progress=_per_batch(progress, _batch_count(p.batches, s.batches)),
    )
    return judge(report, s, baseline)


def judge(report: AuditReport, s: CheckSettings, baseline: Baseline | None = None) -> AuditReport:
    """Apply the ignores, then the baseline: the one read, or with `write_baseline` the one
    this run records (`write_reports` writes it)."""
    report = apply_ignores(report, s.ignore)
    if s.write_baseline:
        path, baseline, is_new = s.write_baseline, from_report(report), True
    elif baseline is not None and s.baseline is not None:
        path, is_new = s.baseline, False
    else:
        return report
    return apply_baseline(
        report, baseline, path=str(path), margin=s.baseline_margin, written=is_new
    )


def _per_batch(
    progress: Callable[[int, int | None], None] | None, total: int | None
) -> Callable[[int], None] | None:
    if progress is None:
        return None
    return lambda done: progress(done, total)


def _batch_count(batches: Iterable[Any], cap: int | None) -> int | None:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return cap
    return n if cap is None else min(n, cap)


def _input_files(s: CheckSettings) -> list[Path]:
    """Files other than the checkpoint that a report must never overwrite."""
    files = [s.config_file] if s.config_file else []
    for spec in (s.data, s.model):
        if spec is None:
            continue
        head = spec.rpartition(":")[0] if not Path(spec).exists() else spec
        if head and Path(head).is_file():
            files.append(Path(head))
    return files


def write_reports(report: AuditReport, s: CheckSettings) -> list[Path]:
    """Write every report file, and the baseline when `write_baseline` is set."""
    written = []
    for _, path, renderer in report_files(s):
        write_atomic(path, renderer(report))
        written.append(path)
    if s.write_baseline:
        write_atomic(s.write_baseline, render_baseline(from_report(report)))
        written.append(s.write_baseline)
    return written


def _model(s: CheckSettings, ckpt: Checkpoint) -> nn.Module:
    if s.model is None:
        if ckpt.module is not None:
            return ckpt.module
        raise ModelError(
            f"{s.checkpoint}: holds a state dict, so the architecture is needed: pass --model "
            "path/to/file.py:factory or package.module:factory"
        )
    model = build_model(s.model)
    if ckpt.state_dict is not None:
        load_into(model, ckpt.state_dict, s.checkpoint)
    elif ckpt.module is not None:
        load_into(model, ckpt.module.state_dict(), s.checkpoint)
    return model


def _batches(s: CheckSettings) -> tuple[Iterable[Any], bool]:
    if s.data and s.input_shape:
        raise BnauditError("give either --data or --input-shape, not both")
    if s.data:
        return load_batches(s.data, s.batch_size), False
    if s.input_shape:
        count = s.batches if s.batches is not None else SYNTHETIC_BATCHES
        return synthetic_batches(parse_shape(s.input_shape), count, s.seed), True
    return [], False


def _device(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise BnauditError(f"--device {spec!r} is not a device (cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BnauditError(f"--device {spec}: CUDA is not available on this machine; use cpu")
    return device


def _log(log: Any, text: str) -> None:
    if log is not None:
        print(f"bnaudit: {text}", file=log)
