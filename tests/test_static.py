"""The static audit (no --model): BN layers found from state-dict keys, judged like a full audit.

Every planted defect is found on exactly the layer where it was planted, and the static checks
give the same findings as `bnaudit.audit` on the live model with no batches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnaudit import audit
from bnaudit.cli import app
from bnaudit.layers import KnownAttrs
from bnaudit.report import Format, render
from bnaudit.results import AuditReport
from bnaudit.static import STATIC_CODES, audit_state_dict
from tests import nets

BN = ["1", "4", "7", "10", "13", "16"]  # the BN layers of nets.build_mlp(depth=6)


@pytest.fixture(scope="module")
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nets.build_mlp(depth=6)
    nets.calibrate(model, nets.mlp_data(40 * 32, seed=1), 32)  # T = 40
    return model.eval()


@pytest.fixture
def mlp(_mlp: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(_mlp)


def codes(report: AuditReport, only: tuple[str, ...] | None = None) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report.findings:
        if only is None or f.code in only:
            out.setdefault(f.layer, set()).add(f.code)
    return out


@torch.no_grad()
def plant(model: nn.Module) -> dict[str, set[str]]:
    """One defect per BN layer but the first; returns layer → the codes it must raise."""
    bn = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)}
    bn["4"].running_mean[3] = math.nan
    bn["7"].running_var[0] = -0.5
    bn["10"].running_var[1] = 0.0
    bn["13"].weight[2] = 1e4
    bn["13"].running_var[2] = 1e-6
    bn["16"].reset_running_stats()
    return {
        "4": {"nonfinite"},
        "7": {"bad-var"},
        "10": {"bad-var"},
        "13": {"tiny-var"},
        "16": {"init-stats"},
    }


def test_healthy_state_dict_passes_with_the_notes(mlp: nn.Module) -> None:
    report = audit_state_dict(mlp.state_dict())
    assert [r.name for r in report.layers] == BN
    assert report.findings == []
    assert report.passed and report.batches == 0 and report.forward_passes == 0
    notes = "\n".join(report.notes)
    assert f"checks run: {', '.join(STATIC_CODES)}" in notes
    assert "need --model: no-running-stats, momentum-warmup, momentum-convention" in notes
    assert "need --model and --data or --input-shape: recon-train" in notes
    assert "assumed 1e-05" in notes and "momentum is not stored" in notes
    for r in report.layers:
        assert r.type == "BatchNorm"
        assert r.metrics.eps == 1e-5
        assert math.isnan(r.metrics.momentum)
        assert r.metrics.num_batches_tracked == 40
        assert r.metrics.stale_judged == "no: static audit"


def test_planted_defects_on_exactly_their_layers(mlp: nn.Module) -> None:
    planted = plant(mlp)
    report = audit_state_dict(mlp.state_dict())
    assert codes(report) == planted
    assert report.layer("7").findings[0].severity.label == "fail"  # negative variance
    assert report.layer("10").findings[0].severity.label == "warn"  # zero variance
    assert not report.passed


def test_static_checks_match_the_full_audit(mlp: nn.Module) -> None:
    """Same LayerAttrs, same `measure`, same `judge_layer`: the same findings, to the message."""
    plant(mlp)
    static = audit_state_dict(mlp.state_dict())
    full = audit(mlp, [], fold=False)  # folding needs the architecture a state dict lacks

    def static_findings(report: AuditReport) -> set[tuple]:
        return {(f.layer, f.code, f.severity, f.message) for f in report.findings}

    assert static_findings(full) == static_findings(static)
    fields = ("nonfinite_values", "negative_var_channels", "zero_var_channels", "initial_stats")
    for s, f in zip(static.layers, full.layers, strict=True):
        assert s.name == f.name
        for field in fields:
            assert getattr(s.metrics, field) == getattr(f.metrics, field), (s.name, field)
        assert s.metrics.max_amplification == pytest.approx(f.metrics.max_amplification)


def test_unknown_momentum_raises_no_momentum_warmup(mlp: nn.Module) -> None:
    with torch.no_grad():
        for m in mlp.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.num_batches_tracked.fill_(1)  # (1 - 0.1)^1 = 0.9 of the initial values
    full = audit(mlp, [])
    assert set(codes(full)) == set(BN) and codes(full)["1"] == {"momentum-warmup"}
    static = audit_state_dict(mlp.state_dict())
    assert static.findings == []
    assert all(math.isnan(r.metrics.init_weight) for r in static.layers)
    assert all(math.isnan(r.metrics.ema_window) for r in static.layers)
    # Where an archive records the momentum (TorchScript), the check runs again.
    known = {name: KnownAttrs("BatchNorm1d", 1e-5, 0.1) for name in BN}
    told = audit_state_dict(mlp.state_dict(), known=known)
    assert codes(told) == codes(full)
    assert any("momentum-warmup" in n for n in told.notes if n.startswith("checks run"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_buffers(mlp: nn.Module, dtype: torch.dtype) -> None:
    mlp.to(dtype)
    static = audit_state_dict(mlp.state_dict())
    assert codes(static) == {name: {"half-buffers"} for name in BN}
    assert static.layer("1").metrics.buffer_dtype == str(dtype).removeprefix("torch.")
    assert codes(audit(mlp, [])) == codes(static)  # the full audit raises it too


def test_frozen_batchnorm_style_groups() -> None:
    """torchvision/detectron2 FrozenBatchNorm2d: four buffers, no num_batches_tracked."""
    g = torch.Generator().manual_seed(0)
    sd = {"backbone.conv1.weight": torch.randn(8, 3, 3, 3, generator=g)}
    for name in ("bn1", "layer1.0.bn1"):
        sd |= {
            f"backbone.{name}.weight": torch.rand(8, generator=g) + 0.5,
            f"backbone.{name}.bias": torch.randn(8, generator=g),
            f"backbone.{name}.running_mean": torch.randn(8, generator=g),
            f"backbone.{name}.running_var": torch.rand(8, generator=g) + 0.1,
        }
    report = audit_state_dict(sd)
    assert [r.name for r in report.layers] == ["backbone.bn1", "backbone.layer1.0.bn1"]
    assert {r.type for r in report.layers} == {"FrozenBatchNorm-style"}
    assert codes(report) == {r.name: {"no-counter"} for r in report.layers}
    assert report.passed  # info only
    assert all(r.metrics.num_batches_tracked is None for r in report.layers)


def test_only_bn_tensors_are_read_and_odd_groups_are_skipped(mlp: nn.Module) -> None:
    sd = dict(mlp.state_dict())
    sd["stats.running_mean"] = torch.zeros(3, 3)  # running stats, but not BN-shaped
    sd["stats.running_var"] = torch.ones(3, 3)
    read: list[str] = []
    report = audit_state_dict(sd, before_read=read.extend)
    assert [r.name for r in report.layers] == BN
    bn_keys = {k for k in sd if k.rpartition(".")[0] in BN}
    assert set(read) == bn_keys
    assert any("stats (running_mean (3, 3)" in n for n in report.notes)


def test_every_report_format_renders_a_static_report(mlp: nn.Module) -> None:
    plant(mlp)
    report = audit_state_dict(mlp.state_dict(), checkpoint="mlp.pt", sha256="ab" * 32)
    table = render(report, Format.TABLE)
    assert "static audit" in table and "ab" * 32 in table and "init-stats" in table
    assert "| 16 " in render(report, Format.MARKDOWN)
    csv = render(report, Format.CSV).splitlines()
    assert "buffer_dtype" in csv[0] and len(csv) == 1 + len(BN)
    data = json.loads(render(report, Format.JSON))
    assert data["summary"]["batches"] == 0
    assert data["layers"][0]["metrics"]["momentum"] is None  # NaN: unknown
    assert any("checks run" in n for n in data["summary"]["notes"])


def test_nothing_to_audit_exits_3(tmp_path: Path) -> None:
    ckpt = tmp_path / "linear.pt"
    torch.save(
        nn.Sequential(
            nn.Linear(4, 4), nn.BatchNorm1d(4, affine=True, track_running_stats=False)
        ).state_dict(),
        ckpt,
    )
    result = CliRunner().invoke(app, ["check", str(ckpt)])
    assert result.exit_code == 3, result.output
    assert "no BatchNorm layer in the state dict" in result.stderr
    assert "track_running_stats=False" in result.stderr


def test_static_audit_exit_codes(tmp_path: Path, mlp: nn.Module) -> None:
    ckpt = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), ckpt)
    assert CliRunner().invoke(app, ["check", str(ckpt)]).exit_code == 0
    plant(mlp)
    torch.save(mlp.state_dict(), ckpt)
    result = CliRunner().invoke(app, ["check", str(ckpt), "--markdown", str(tmp_path / "r.md")])
    assert result.exit_code == 1
    assert "static audit" in (tmp_path / "r.md").read_text()
    never = CliRunner().invoke(app, ["check", str(ckpt), "--fail-on", "never"])
    assert never.exit_code == 0
