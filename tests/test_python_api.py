"""The Python API: what `dir(bnaudit)` shows, the report's repr/summary/render, the pytest
helper's message, and the training-loop callbacks (Lightning stubbed: it is not installed)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import types
from typing import Any

import pytest
import torch
from torch import nn

import bnaudit
import bnaudit.integrations.callbacks
from bnaudit.integrations.callbacks import audit_after_epoch, layer_metrics
from bnaudit.integrations.testing import assert_bn_healthy
from bnaudit.report.render import Format, summary_line
from bnaudit.verdict.results import LayerMetrics, LayerResult
from tests import nets
from tests.test_audit import assert_same, mlp_batches, snapshot

PLANTED_LAYER = "4"  # the BatchNorm1d behind Linear "3" in nets.build_mlp


@torch.no_grad()
def plant_stale(model: nn.Module) -> None:
    """Scale Linear "3"'s outputs by 1.5–3× per channel, as fine-tuning with frozen BN would:
    batch statistics undo it in train mode, so only BN "4"'s running stats are stale."""
    scale = 1.5 + 1.5 * torch.rand(32, generator=torch.Generator().manual_seed(1))
    model[3].weight.mul_(scale[:, None])
    model[3].bias.mul_(scale)


API = {
    "AuditOptions",
    "AuditReport",
    "FailOn",
    "Finding",
    "Format",
    "LayerResult",
    "Severity",
    "Thresholds",
    "assert_bn_healthy",
    "audit",
    "audit_after_epoch",
}


def test_dir_lists_the_lazy_api_in_a_fresh_interpreter() -> None:
    code = "import bnaudit, sys; print(' '.join(dir(bnaudit))); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert set(out[0].split()) >= API
    assert out[1] == "False"  # listing the names imports nothing heavy
    for name in API:
        assert getattr(bnaudit, name) is not None


@pytest.fixture
def stale_report(healthy_mlp: nn.Module) -> bnaudit.AuditReport:
    plant_stale(healthy_mlp)
    return bnaudit.audit(healthy_mlp, mlp_batches(16, count=4), impact=False)


def test_repr_is_one_line_with_the_verdict(stale_report: bnaudit.AuditReport) -> None:
    text = repr(stale_report)
    assert "\n" not in text and len(text) < 200
    counts = stale_report.counts()
    assert text.startswith("<AuditReport FAIL: 4 BN layers (fail 1, ")
    assert f"warn {counts['warn']}" in text and "ok" not in text  # zero counts left out
    assert f"{len(stale_report.failing)} failing at fail_on=fail, 4 batches>" in text


def test_summary_and_render_are_the_terminal_text(stale_report: bnaudit.AuditReport) -> None:
    summary = stale_report.summary()
    assert summary.splitlines()[-1] == summary_line(stale_report)  # the verdict is last
    # findings grouped by code, as the terminal shows them (tests/test_summary.py: the same text)
    assert re.search(rf"^FAIL +stale-stats +1 +{PLANTED_LAYER}$", summary, re.M), summary
    table = stale_report.render()
    assert table == stale_report.render("table") == summary
    assert stale_report.render(Format.MARKDOWN).startswith("# bnaudit report: FAIL")
    layers = {r["name"] for r in json.loads(stale_report.render("json"))["layers"]}
    assert PLANTED_LAYER in layers
    assert stale_report.render("csv").splitlines()[0].startswith("layer,type,verdict")
    with pytest.raises(ValueError, match="choose one of table, markdown, csv, json"):
        stale_report.render("html")


# --- pytest helper ------------------------------------------------------------------------------


def test_assert_bn_healthy_passes_and_returns_the_report(healthy_mlp: nn.Module) -> None:
    report = assert_bn_healthy(healthy_mlp, mlp_batches(16, count=4), impact=False)
    assert report.passed and len(report.layers) == 4


def test_assert_bn_healthy_names_layers_codes_values_and_limits(healthy_mlp: nn.Module) -> None:
    plant_stale(healthy_mlp)
    before = snapshot(healthy_mlp)
    with pytest.raises(AssertionError) as info:
        assert_bn_healthy(healthy_mlp, mlp_batches(16, count=4), impact=False, stale_shift=0.25)
    assert_same(healthy_mlp, before)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("BatchNorm audit failed (fail_on=fail): ")
    planted = [line for line in lines if line.strip().startswith(f"{PLANTED_LAYER}: stale-stats")]
    assert len(planted) == 1
    assert re.search(r"stale-stats \(fail\) value [-+.e\d]+, limit [-+.e\d]+: ", planted[0])
    assert "mean shift up to" in planted[0] and "(limit 0.25)" in planted[0]
    assert "dataclass" not in str(info.value) and "LayerMetrics" not in str(info.value)


def test_assert_bn_healthy_takes_the_gate_and_thresholds(healthy_mlp: nn.Module) -> None:
    plant_stale(healthy_mlp)
    batches = mlp_batches(16, count=4)
    assert_bn_healthy(healthy_mlp, batches, impact=False, fail_on="never")
    loose = assert_bn_healthy(
        healthy_mlp, batches, impact=False, stale_shift=50.0, stale_log_var=50.0
    )
    assert not any(f.code == "stale-stats" for f in loose.findings)
    with pytest.raises(TypeError, match="no_such_threshold"):
        assert_bn_healthy(healthy_mlp, batches, no_such_threshold=1.0)


# --- training-loop callbacks ----------------------------------------------------------------


def test_audit_after_epoch_logs_per_layer_metrics(healthy_mlp: nn.Module) -> None:
    plant_stale(healthy_mlp)
    healthy_mlp.train()  # mid-training: it must come back in train mode, buffers unchanged
    before = snapshot(healthy_mlp)
    logged: list[dict[str, float]] = []
    report = audit_after_epoch(healthy_mlp, iter(mlp_batches(16, count=6)), log=logged.append)
    assert_same(healthy_mlp, before)
    assert report.batches == 4  # the default max_batches, from a one-shot iterator
    assert len(logged) == 1
    metrics = logged[0]
    assert metrics == layer_metrics(report)
    assert metrics[f"bn/{PLANTED_LAYER}/severity"] == 3.0
    assert metrics[f"bn/{PLANTED_LAYER}/stale_shift_max"] > 0.3
    assert metrics["bn/failing"] == len(report.failing) >= 1
    assert {k.split("/")[1] for k in metrics if k != "bn/failing"} == {
        r.name for r in report.layers
    }
    assert all(v == v for v in metrics.values())  # no NaN reaches a logger


def test_layer_metrics_leave_out_what_was_not_measured() -> None:
    unmeasured = LayerMetrics.unmeasured("no batches", channels=4, kind="batch")
    measured = LayerMetrics.from_flat(
        **(unmeasured.flat() | {"stale_shift_max": 0.5, "recon_eval_ratio": math.inf})
    )
    report = bnaudit.AuditReport(
        layers=(LayerResult("a", "BatchNorm2d", unmeasured), LayerResult("b", "X", measured))
    )
    assert layer_metrics(report, prefix="x.") == {
        "x.a/severity": 0.0,
        "x.b/stale_shift_max": 0.5,
        "x.b/severity": 0.0,
        "x.failing": 0.0,
    }


class _Callback:
    """Stands in for lightning.pytorch.Callback."""


class _Module(nn.Module):
    """A LightningModule's part that the callback uses: forward and log_dict."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.logged: list[dict[str, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def log_dict(self, metrics: dict[str, float], **kwargs: Any) -> None:
        self.logged.append(metrics)


@pytest.fixture
def stub_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    lightning = types.ModuleType("lightning")
    pytorch = types.ModuleType("lightning.pytorch")
    pytorch.Callback = _Callback  # type: ignore[attr-defined]
    lightning.pytorch = pytorch  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning", lightning)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", pytorch)
    monkeypatch.delitem(bnaudit.integrations.callbacks.__dict__, "BNAuditCallback", raising=False)


def test_lightning_callback_audits_validation_batches(
    stub_lightning: None, healthy_mlp: nn.Module
) -> None:
    plant_stale(healthy_mlp)
    module = _Module(healthy_mlp)
    images = nets.mlp_data(16 * 5, seed=3)
    labels = torch.zeros(16 * 5, dtype=torch.long)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
    callback = bnaudit.integrations.callbacks.BNAuditCallback(
        max_batches=2, every_n_epochs=2, prefix="v/"
    )
    assert isinstance(callback, _Callback)
    trainer = types.SimpleNamespace(
        sanity_checking=False, current_epoch=0, val_dataloaders=[val], train_dataloader=None
    )
    callback.on_train_epoch_end(trainer, module)  # epoch 1 of every 2: skipped
    assert module.logged == [] and callback.report is None
    trainer.current_epoch = 1
    callback.on_train_epoch_end(trainer, module)
    assert callback.report is not None and callback.report.batches == 2
    assert len(module.logged) == 1
    assert module.logged[0][f"v/inner.{PLANTED_LAYER}/severity"] == 3.0


def test_lightning_callback_without_lightning_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(bnaudit.integrations.callbacks.__dict__, "BNAuditCallback", raising=False)
    with pytest.raises(ImportError, match=r"pip install lightning; without it, call"):
        bnaudit.integrations.callbacks.BNAuditCallback  # noqa: B018 - the attribute access is the test


# The reports' flat metric names, in order: CSV columns, JSON `metrics` keys, to_frame columns.
REPORT_METRICS = (
    "kind",
    "channels",
    "eps",
    "momentum",
    "affine",
    "track_running_stats",
    "num_batches_tracked",
    "dtype",
    "buffer_dtype",
    "nonfinite_values",
    "negative_var_channels",
    "zero_var_channels",
    "initial_stats",
    "max_amplification",
    "calls",
    "values_per_channel",
    "batch_size",
    "nonfinite_inputs",
    "nonfinite_outputs",
    "recon_train_max_err",
    "recon_train_ratio",
    "recon_eval_max_err",
    "recon_eval_ratio",
    "recon_train_explanation",
    "recon_train_explanation_key",
    "recon_train_explanation_err",
    "recon_train_explanation_ratio",
    "recon_eval_explanation",
    "recon_eval_explanation_key",
    "recon_eval_explanation_err",
    "recon_eval_explanation_ratio",
    "update_mean_ratio",
    "update_var_ratio",
    "update_count_errors",
    "stale_shift_max",
    "stale_shift_median",
    "stale_log_var_max",
    "stale_log_var_median",
    "stale_fraction",
    "stale_p",
    "stale_channel",
    "stale_judged",
    "gap_shift_max",
    "gap_log_var_max",
    "gap_fraction",
    "gap_p",
    "gap_channel",
    "gap_judged",
    "bessel_factor",
    "var_ratio_observed",
    "eval_scale",
    "init_weight",
    "ema_window",
    "ema_jitter",
    "step_shift",
    "step_log_var",
    "output_change_alone",
    "fold_with",
    "fold_checked",
    "fold_max_err",
    "fold_ratio",
    "folded_weight_max",
    "fold_int8_levels",
    "counter_problem",
    "measured_at",
    "artifact_place",
    "artifact_node",
    "artifact_param_ratio",
    "artifact_output_err",
)


def test_layer_metrics_flat_names_are_the_report_columns_in_order() -> None:
    m = LayerMetrics.unmeasured("no batches", channels=4, kind="batch")
    assert tuple(m.flat()) == REPORT_METRICS
    assert repr(LayerMetrics.from_flat(**m.flat())) == repr(m)  # NaN != NaN: compare the text
    assert m.flat()["stale_judged"] == m.train.drift.judged == "no: no batches"
    assert m.flat()["gap_channel"] == m.eval.drift.channel == -1
    with pytest.raises(TypeError, match="no metric named stale_shift"):
        LayerMetrics.from_flat(**m.flat(), stale_shift=1.0)
