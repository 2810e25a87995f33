"""`bnaudit check` as a library call: load, audit, judge the gate, write the reports.

The gate judges the audit in two steps: ignore entries of the configuration first (those
findings are accepted for good, with their reason), then the baseline (findings accepted as
they were measured when it was written).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bnaudit.check.audit import AuditOptions, audit
from bnaudit.check.counters import with_counter_findings
from bnaudit.check.static import audit_state_dict
from bnaudit.checkpoint.formats import FileKind
from bnaudit.checkpoint.into_model import load_into
from bnaudit.checkpoint.loading import Checkpoint, load_checkpoint
from bnaudit.core.errors import BnauditError, ReportError
from bnaudit.core.limits import DEFAULT_MAX_BATCHES
from bnaudit.core.untrusted import clean, plain
from bnaudit.gate.baseline import (
    from_report,
    read_baseline,
    render_baseline,
)
from bnaudit.gate.config import CheckSettings, hash_skipped
from bnaudit.gate.decision import judge
from bnaudit.inputs.batches import load_batches, parse_shape, synthetic_batches
from bnaudit.inputs.calls import parse_input
from bnaudit.inputs.images import DEFAULT_MAX_IMAGES, DEFAULTS, ImageFolder, from_timm, with_options
from bnaudit.inputs.precision import autocast_forward
from bnaudit.inputs.precision import note as precision_note
from bnaudit.inputs.registry import build_model, registry_of, timm_data_config
from bnaudit.inputs.specs import import_object
from bnaudit.measure.progress import ProgressFn
from bnaudit.report.audit_report import AuditReport
from bnaudit.report.github import stderr_line
from bnaudit.report.html import render_html
from bnaudit.report.junit import render_junit
from bnaudit.report.render import Format, check_writable, render
from bnaudit.report.writing import text_writer, write_set

if TYPE_CHECKING:
    from bnaudit.distributed import Ranks

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
    refuse_clashes([(option, path) for option, path, _ in report_files(s)], inputs, s)


def refuse_clashes(outputs: list[tuple[str, Path]], inputs: list[Path], s: CheckSettings) -> None:
    """Refuse an output over an input or the baseline read, in a missing folder, or given twice
    (`outputs`: option and path of each report; --write-baseline is added here)."""
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
    notes: tuple[str, ...] = ()  # what loading into the model stripped or converted


def prepare(
    s: CheckSettings, log: Any = None, ranks: Ranks | None = None, *, hashed: bool = True
) -> Prepared | AuditReport:
    """Load the checkpoint into the model on its device and open the batches (with `ranks`,
    this rank's shard of them); `hashed=False` leaves the checkpoint's SHA-256 out.

    Without a model (a bare state dict and no --model), the static audit is all there is to
    do: its report comes back instead.
    """
    device = device_of(s.device)
    if s.model_args and s.model is None:
        raise BnauditError(
            f"--model-arg {s.model_args[0]}: arguments for the --model factory need --model"
        )
    torch.manual_seed(s.seed)
    ckpt = load_checkpoint(s.checkpoint, trust=s.trust, key=s.key, hashed=hashed)
    if ckpt.kind is FileKind.ONNX and s.model is not None:
        raise BnauditError(
            f"{s.checkpoint}: an ONNX model holds no PyTorch state dict to load into --model; "
            "to compare it with the checkpoint it came from, pass --against CKPT as well"
        )
    if s.model is None and ckpt.module is None:
        return _static(s, ckpt, log)
    model, notes = _model(s, ckpt)
    model.to(device)
    batches, synthetic = _batches(s, model, ranks)
    if isinstance(batches, ImageFolder):
        notes = (*notes, _images_note(s, batches))
        log_line(log, notes[-1])
    what = f"pickled module, {ckpt.source}" if ckpt.module is not None else ckpt.source
    log_line(log, f"auditing {s.checkpoint} ({what}) on {device}")
    return Prepared(ckpt, model, batches, synthetic, notes)


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
        input=parse_input(s.input),
        metric=_metric(s.metric),
        metric_name=s.metric or "",
    )


def _metric(spec: str | None) -> Callable[..., float] | None:
    if spec is None:
        return None
    fn = import_object(spec, what="--metric")
    if not callable(fn):
        raise BnauditError(f"--metric {spec}: {type(fn).__name__} is not callable")
    return fn


def run_check(
    s: CheckSettings,
    log: Any = None,
    progress: ProgressFn | None = None,
    ranks: Ranks | None = None,
) -> AuditReport:
    """Everything `bnaudit check` does before rendering; raises BnauditError subclasses.

    Under torchrun (`ranks`, whose `settings` these are), this rank audits its shard and the
    report is the merged one.

    The report comes back judged: ignores applied, then the baseline (written first when
    `write_baseline` is set, so that the run is judged against what it wrote). `progress`, when
    given, is called after each batch of every pass, with its stage (`bnaudit.measure.progress`).
    """
    check_outputs(s)  # fail before the audit, not after it
    # A broken baseline fails before the audit too.
    baseline = read_baseline(s.baseline) if s.baseline and not s.write_baseline else None
    unhashed = hash_skipped(s, os.environ)  # why the SHA-256 is left out, None when it is not
    p = prepare(s, log, ranks, hashed=unhashed is None)
    if isinstance(p, AuditReport):  # no model: the static audit
        return judge(dataclasses.replace(p, sha256_skipped=unhashed), s, baseline)
    device = device_of(s.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with autocast_forward(p.model, s.autocast, device):
        report = audit(
            p.model,
            p.batches,
            options=audit_options(s, p),
            checkpoint=clean(str(s.checkpoint)),
            sha256=p.checkpoint.sha256,
            progress=progress,
            ranks=ranks,
        )
    notes = [*p.checkpoint.notes, *p.notes, *report.notes, *_run_notes(s, device, ranks)]
    report = dataclasses.replace(report, notes=tuple(notes), sha256_skipped=unhashed)
    return judge(_counters(report, p.checkpoint, s), s, baseline)


def _counters(report: AuditReport, ckpt: Checkpoint, s: CheckSettings) -> AuditReport:
    """The BN counters against the checkpoint's step count, when it is a training one."""
    return with_counter_findings(
        report, ckpt.steps, steps_per_epoch=s.steps_per_epoch, accumulate=s.accumulate
    )


def _run_notes(s: CheckSettings, device: torch.device, ranks: Ranks | None) -> list[str]:
    """How the audit ran: under autocast, on how many ranks, and its peak GPU memory."""
    notes = [precision_note(s.autocast, device)] if s.autocast.dtype is not None else []
    if ranks is not None:
        notes.append(
            f"audited on {ranks.world} ranks (torch.distributed): each ran its shard of the "
            "batches, the accumulators were merged exactly"
        )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        notes.append(f"peak GPU memory on {device}: {peak:.0f} MiB (rank 0's when distributed)")
    return notes


def _input_files(s: CheckSettings) -> list[Path]:
    """Files other than the checkpoint that a report must never overwrite."""
    files = [s.config_file] if s.config_file else []
    if s.against is not None:
        files.append(s.against)
    for spec in (s.data, s.model, s.metric):
        if spec is None:
            continue
        head = spec.rpartition(":")[0] if not Path(spec).exists() else spec
        if head and Path(head).is_file():
            files.append(Path(head))
    return files


def write_reports(report: AuditReport, s: CheckSettings) -> list[Path]:
    """Write every report file, and the baseline when `write_baseline` is set."""
    files = [(path, renderer(report)) for _, path, renderer in report_files(s)]
    if s.write_baseline:
        files.append((s.write_baseline, render_baseline(from_report(report))))
    write_set([(path, text_writer(text)) for path, text in files])  # all or none replaced
    return [path for path, _ in files]


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
    log_line(log, f"auditing {s.checkpoint} ({ckpt.source}) statically: no --model")
    report = audit_state_dict(
        ckpt.state_dict,
        thresholds=s.thresholds,
        fail_on=s.fail_on,
        known=ckpt.known,
        before_read=ckpt.verify,
        after_read=ckpt.release_pages,
        checkpoint=clean(str(s.checkpoint)),
        sha256=ckpt.sha256,
        notes=ckpt.notes,
        training=ckpt.training,
        counted=ckpt.kind is not FileKind.ONNX,
    )
    return _counters(report, ckpt, s)


def _model(s: CheckSettings, ckpt: Checkpoint) -> tuple[nn.Module, tuple[str, ...]]:
    """The model to audit, and the notes on loading the checkpoint into it."""
    if s.model is None:
        assert ckpt.module is not None  # run_check audits a bare state dict statically
        return ckpt.module, ()
    model = build_model(s.model, s.model_args)
    notes: tuple[str, ...] = ()
    if ckpt.state_dict is not None:
        ckpt.verify(ckpt.state_dict)  # load_state_dict reads every tensor
        notes = load_into(model, ckpt.state_dict, s.checkpoint)
    elif ckpt.module is not None:
        notes = load_into(model, ckpt.module.state_dict(), s.checkpoint)
    return model, notes


def _batches(
    s: CheckSettings, model: nn.Module, ranks: Ranks | None = None
) -> tuple[Iterable[Any], bool]:
    if s.data and s.input_shape:
        raise BnauditError("give either --data or --input-shape, not both")
    if s.data:
        if Path(s.data).is_dir():
            return _image_folder(s, model), False
        if s.image_size is not None or s.mean is not None or s.std is not None:
            raise BnauditError(
                f"--data {s.data}: --image-size, --mean and --std preprocess a folder of "
                "images; batches from a file or a function are used as they are"
            )
        if ranks is not None:
            return ranks.load(s.data, s.batch_size, s.batches), False
        batches = load_batches(s.data, s.batch_size)
        count = len(batches) if isinstance(batches, list) else None
        if s.batches is None and count is not None and count > DEFAULT_MAX_BATCHES:
            raise BnauditError(
                f"--data {plain(s.data)}: {count} batches of --batch-size {s.batch_size}, more "
                f"than {DEFAULT_MAX_BATCHES} (DEFAULT_MAX_BATCHES), and each costs a forward "
                "pass; pass --batches N to use the first N (a few hundred are enough), or a "
                "larger --batch-size"
            )
        return batches, False
    if s.input_shape:
        count = s.batches if s.batches is not None else SYNTHETIC_BATCHES
        synthetic = synthetic_batches(parse_shape(s.input_shape), count, s.seed)
        return (synthetic if ranks is None else ranks.shard(synthetic, count)), True
    return [], False


def _image_folder(s: CheckSettings, model: nn.Module) -> ImageFolder:
    """A folder of images, preprocessed the way the model's family expects."""
    assert s.data is not None
    preprocess = DEFAULTS
    registry = registry_of(s.model) if s.model else None
    if registry is not None and registry[0] == "timm":
        preprocess = from_timm(timm_data_config(model), registry[1])
    preprocess = with_options(preprocess, s.image_size, s.mean, s.std)
    # --batches caps the images; without it a large folder is sampled (seeded).
    limit = s.batches * s.batch_size if s.batches is not None else DEFAULT_MAX_IMAGES
    batches = load_batches(
        s.data, s.batch_size, preprocess=preprocess, max_images=limit, seed=s.seed
    )
    assert isinstance(batches, ImageFolder)
    return batches


def _images_note(s: CheckSettings, folder: ImageFolder) -> str:
    files, total = len(folder.files), folder.total
    sampled = f"{files} images"
    if files < total:
        sampled = f"{files} of {total} images (a sample, seed {s.seed})"
    return (
        f"--data {s.data}: {sampled} in {len(folder)} batches of {folder.batch_size}; "
        + folder.preprocess.describe()
    )


def device_of(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise BnauditError(f"--device {spec!r} is not a device (cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BnauditError(f"--device {spec}: CUDA is not available on this machine; use cpu")
    return device


def log_line(log: Any, text: str) -> None:
    """A progress line; it quotes the paths given, so it is escaped (and guarded under GitHub
    Actions) like an error."""
    if log is not None:
        log.write(stderr_line(f"bnaudit: {text}", os.environ))
