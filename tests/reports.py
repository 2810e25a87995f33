"""Hand-built reports and golden files for the renderer tests.

`hostile_report()` is deterministic to the byte (no torch arithmetic behind it) and carries
layer names that try to inject workflow commands, markdown, HTML and XML: every renderer must
keep them inert.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bnaudit.report.audit_report import AuditReport
from bnaudit.verdict.codes import hint
from bnaudit.verdict.findings import Thresholds
from bnaudit.verdict.results import FailOn, Finding, LayerMetrics, LayerResult, Severity

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("BNAUDIT_REGENERATE") == "1"

# A name as a malicious checkpoint could carry it (module names are any string in a pickle).
EVIL = "evil\n::error::pwned, 100%: ##[add-mask]x <script>alert(1)</script> | [a](http://x)\x1b"


def metrics(**values: Any) -> LayerMetrics:
    """LayerMetrics with every number unmeasured (NaN, 0, "") except `values`, by flat name."""
    defaults: dict[str, Any] = dict(
        kind="batch",
        channels=8,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        num_batches_tracked=400,
        dtype="float32",
        stale_channel=-1,
        gap_channel=-1,
        stale_judged="yes",
        gap_judged="yes",
        calls=4,
        values_per_channel=16,
        batch_size=16,
    )
    return LayerMetrics.unmeasured("", **(defaults | values))


def finding(
    layer: str, code: str, severity: Severity, message: str, value: float, situation: str = ""
) -> Finding:
    return Finding(layer, code, severity, message, hint(code, situation), value, 0.1)


def hostile_report(**changes: Any) -> AuditReport:
    """Four layers: one healthy, one stale (fail), a hostile name (warn), a head (warn)."""
    layers = (
        LayerResult(
            "stem.bn",
            "BatchNorm1d",
            metrics(recon_train_ratio=0.02, recon_eval_ratio=0.03, stale_shift_max=0.05,
                    stale_log_var_max=0.01, gap_fraction=0.0),
        ),
        LayerResult(
            "blocks.0.bn",
            "BatchNorm1d",
            metrics(recon_train_ratio=0.02, recon_eval_ratio=0.04, stale_shift_max=1.7,
                    stale_log_var_max=-0.9, stale_fraction=0.5, gap_fraction=0.5),
            (finding("blocks.0.bn", "stale-stats", Severity.FAIL,
                     "running stats do not describe the train-mode input: 50% of channels", 0.5,
                     "stale"),),
        ),
        LayerResult(
            EVIL,
            "BatchNorm1d",
            metrics(recon_train_ratio=3.5, recon_eval_ratio=0.01, stale_shift_max=0.1,
                    stale_log_var_max=0.5, gap_fraction=0.0),
            (finding(EVIL, "var-bias", Severity.WARN, f"N = 16 values per channel in {EVIL}",
                     0.032),),
        ),
        LayerResult(
            "head.bn",
            "BatchNorm1d",
            metrics(recon_train_ratio=0.01, recon_eval_ratio=0.01, stale_shift_max=0.2,
                    stale_log_var_max=0.1, gap_fraction=0.0),
            (finding("head.bn", "var-bias", Severity.WARN, "N = 16 values per channel", 0.032),),
        ),
    )  # fmt: skip
    report = AuditReport(
        layers=layers,
        fail_on=FailOn.FAIL,
        batches=4,
        forward_passes=8,
        checkpoint="model.pt",
        sha256="0123456789abcdef" * 4,
        thresholds=dataclasses.asdict(Thresholds()),
    )
    return dataclasses.replace(report, **changes)


def golden(name: str, text: str) -> str:
    """The golden text `name`; with BNAUDIT_REGENERATE=1 it is (re)written from `text` first."""
    path = GOLDEN / name
    if REGENERATE:
        path.write_bytes(text.encode("utf-8"))
    if not path.exists():
        raise AssertionError(f"{path} is missing: run the tests with BNAUDIT_REGENERATE=1")
    return path.read_bytes().decode("utf-8")


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Torch on one thread, restored after. These tests run tiny models: on a busy machine with
    few cores, OpenMP threads waiting for each other make them 100x slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
