"""`bnaudit check` as a library call: load, audit, write the reports."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnaudit.audit import AuditOptions, audit
from bnaudit.batches import load_batches, parse_shape, synthetic_batches
from bnaudit.config import CheckSettings
from bnaudit.errors import BnauditError
from bnaudit.loading import Checkpoint, build_model, load_checkpoint, load_into
from bnaudit.report import Format, check_writable, render, write_atomic
from bnaudit.results import AuditReport
from bnaudit.static import audit_state_dict

SYNTHETIC_BATCHES = 4  # synthetic batches when --batches is not given


def report_paths(s: CheckSettings) -> dict[Format, Path]:
    paths = {Format.MARKDOWN: s.markdown, Format.CSV: s.csv, Format.JSON: s.json}
    return {fmt: p for fmt, p in paths.items() if p is not None}


@dataclass(frozen=True)
class Prepared:
    """What an audit runs on: the checkpoint, the model it was loaded into, the batches."""

    checkpoint: Checkpoint
    model: nn.Module
    batches: Iterable[Any]
    synthetic: bool


def prepare(s: CheckSettings, log: Any = None) -> Prepared | AuditReport:
    """Load the checkpoint into the model on its device and open the batches.

    Without a model (a bare state dict and no --model), the static audit is all there is to
    do: its report comes back instead.
    """
    device = _device(s.device)
    torch.manual_seed(s.seed)
    ckpt = load_checkpoint(s.checkpoint, trust=s.trust, key=s.key)
    if s.model is None and ckpt.module is None:
        return _static(s, ckpt, log)
    model = _model(s, ckpt)
    model.to(device)
    batches, synthetic = _batches(s)
    what = f"pickled module, {ckpt.source}" if ckpt.module is not None else ckpt.source
    _log(log, f"auditing {s.checkpoint} ({what}) on {device}")
    return Prepared(ckpt, model, batches, synthetic)


def audit_options(s: CheckSettings, p: Prepared, layers: tuple[str, ...] | None = None):
    return AuditOptions(
        thresholds=s.thresholds,
        train_mode=s.train_mode.value,
        fail_on=s.fail_on,
        max_batches=s.batches,
        synthetic_data=p.synthetic,
        layers=layers,
        impact=s.impact and layers is None,
        regime=s.regime.value,
        attribution=s.attribution,
    )


def run_check(s: CheckSettings, log: Any = None) -> AuditReport:
    """Everything `bnaudit check` does before rendering; raises BnauditError subclasses."""
    inputs = [s.checkpoint, *_input_files(s)]
    for path in report_paths(s).values():  # fail before the audit, not after it
        check_writable(path, inputs)
    p = prepare(s, log)
    if isinstance(p, AuditReport):
        return p
    report = audit(
        p.model,
        p.batches,
        options=audit_options(s, p),
        checkpoint=str(s.checkpoint),
        sha256=p.checkpoint.sha256,
    )
    return dataclasses.replace(report, notes=(*p.checkpoint.notes, *report.notes))


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


def _static(s: CheckSettings, ckpt: Checkpoint, log: Any) -> AuditReport:
    """No model: judge the state dict itself; batches have nothing to run through."""
    if s.data or s.input_shape:
        what = "--data" if s.data else "--input-shape"
        why = (
            "its compiled layers cannot be hooked"
            if ckpt.kind.is_code
            else "a state dict holds no architecture to run them through"
        )
        raise BnauditError(
            f"{s.checkpoint}: {what} needs --model: {why}. Pass --model path/to/file.py:factory "
            f"for the full audit, or drop {what} for the static audit"
        )
    assert ckpt.state_dict is not None  # a checkpoint holds a module or a state dict
    _log(log, f"auditing {s.checkpoint} ({ckpt.source}) statically: no --model")
    return audit_state_dict(
        ckpt.state_dict,
        thresholds=s.thresholds,
        fail_on=s.fail_on,
        known=ckpt.known,
        before_read=ckpt.verify,
        checkpoint=str(s.checkpoint),
        sha256=ckpt.sha256,
        notes=ckpt.notes,
    )


def write_reports(report: AuditReport, s: CheckSettings) -> list[Path]:
    written = []
    for fmt, path in report_paths(s).items():
        write_atomic(path, render(report, fmt))
        written.append(path)
    return written


def _model(s: CheckSettings, ckpt: Checkpoint) -> nn.Module:
    if s.model is None:
        assert ckpt.module is not None  # run_check audits a bare state dict statically
        return ckpt.module
    model = build_model(s.model)
    if ckpt.state_dict is not None:
        ckpt.verify(ckpt.state_dict)  # load_state_dict reads every tensor
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
