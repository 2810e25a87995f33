"""The static audit (no --model): BN layers found from state-dict keys, judged like a full audit.

Every planted defect is found on exactly the layer where it was planted, and the static checks
give the same findings as `bnaudit.audit` on the live model with no batches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnaudit import audit
from bnaudit.check.static import STATIC_CODES, audit_state_dict
from bnaudit.cli import app
from bnaudit.core.layers import KnownAttrs
from bnaudit.report.audit_report import AuditReport
from bnaudit.report.render import Format, render
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
        assert r.metrics.attrs.eps == 1e-5
        assert math.isnan(r.metrics.attrs.momentum)
        assert r.metrics.attrs.num_batches_tracked == 40
        assert r.metrics.train.drift.judged == "no: static audit"


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
            assert getattr(s.metrics.stored, field) == getattr(f.metrics.stored, field), field
        assert s.metrics.stored.max_amplification == pytest.approx(
            f.metrics.stored.max_amplification
        )


def test_unknown_momentum_raises_no_momentum_warmup(mlp: nn.Module) -> None:
    with torch.no_grad():
        for m in mlp.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.num_batches_tracked.fill_(1)  # (1 - 0.1)^1 = 0.9 of the initial values
    full = audit(mlp, [])
    assert set(codes(full)) == set(BN) and codes(full)["1"] == {"momentum-warmup"}
    static = audit_state_dict(mlp.state_dict())
    assert static.findings == []
    assert all(math.isnan(r.metrics.update.init_weight) for r in static.layers)
    assert all(math.isnan(r.metrics.update.ema_window) for r in static.layers)
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
    assert static.layer("1").metrics.attrs.buffer_dtype == str(dtype).removeprefix("torch.")
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
    assert all(r.metrics.attrs.num_batches_tracked is None for r in report.layers)


def test_only_bn_tensors_are_read_and_odd_groups_are_findings(mlp: nn.Module) -> None:
    sd = dict(mlp.state_dict())
    sd["stats.running_mean"] = torch.zeros(3, 3)  # running stats, but not BN-shaped
    sd["stats.running_var"] = torch.ones(3, 3)
    read: list[str] = []
    report = audit_state_dict(sd, before_read=read.extend)
    assert [r.name for r in report.layers] == [*BN, "stats"]
    bn_keys = {k for k in sd if k.rpartition(".")[0] in BN}
    assert set(read) == bn_keys  # the odd group's shapes tell it apart, not its data
    assert codes(report) == {"stats": {"not-audited"}}
    assert "running_mean (3, 3), running_var (3, 3)" in report.layer("stats").findings[0].message


def _float_counters(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if k.endswith("num_batches_tracked") else v for k, v in sd.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int32])
def test_a_counter_of_any_real_dtype_is_a_count(mlp: nn.Module, dtype: torch.dtype) -> None:
    report = audit_state_dict(_float_counters(mlp.state_dict(), dtype))
    assert [r.name for r in report.layers] == BN
    assert report.findings == [] and report.passed
    assert all(r.metrics.attrs.num_batches_tracked == 40 for r in report.layers)
    name = str(dtype).removeprefix("torch.")
    assert any(
        n.startswith(f"num_batches_tracked stored as {name} in 6 layers: 1, 4, 7, 10, 13, 16")
        for n in report.notes
    ), report.notes


def test_type_float_tensor_checkpoint_exits_0(tmp_path: Path, mlp: nn.Module) -> None:
    """`.type(torch.FloatTensor)` converts every tensor, the counter included."""
    ckpt = tmp_path / "mlp.pt"
    torch.save(mlp.type(torch.FloatTensor).state_dict(), ckpt)
    assert mlp.get_submodule("1").num_batches_tracked.dtype == torch.float32
    result = CliRunner().invoke(app, ["check", str(ckpt), "-f", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["name"] for r in doc["layers"]] == BN
    assert any("stored as float32 in 6 layers" in n for n in doc["summary"]["notes"])


@pytest.mark.parametrize(
    ("counter", "says"),
    [
        (torch.tensor(math.nan), "nan (torch.float32)"),
        (torch.tensor(math.inf, dtype=torch.float16), "inf (torch.float16)"),
        (torch.tensor(-3.0), "-3 (torch.float32), negative"),
        (torch.tensor(-1), "-1 (torch.int64), negative"),
        (torch.tensor([2.5]), "2.5 (torch.float32), not a whole number"),
        (torch.tensor([4, 4]), "shape (2,) (torch.int64), not one number"),
        (torch.tensor(True), "dtype torch.bool"),
    ],
)
def test_a_counter_that_is_no_count_is_a_finding(
    mlp: nn.Module, counter: torch.Tensor, says: str
) -> None:
    sd = dict(mlp.state_dict())
    sd["7.num_batches_tracked"] = counter
    report = audit_state_dict(sd)
    assert [r.name for r in report.layers] == BN
    assert codes(report) == {"7": {"bad-counter"}}  # and no no-counter: it has one
    finding = report.layer("7").findings[0]
    assert finding.severity.label == "warn" and says in finding.message, finding.message
    assert report.layer("7").metrics.attrs.num_batches_tracked is None
    assert report.passed  # warn: the counter does not enter the output


@pytest.mark.parametrize(
    ("plant", "says"),
    [
        (lambda sd: sd.update({"7.running_var": sd["7.running_var"][:20]}), "running_var (20,)"),
        (lambda sd: sd.update({"7.running_mean": torch.zeros(4, 8)}), "running_mean (4, 8)"),
        (lambda sd: sd.update({"7.weight": sd["7.weight"][:5]}), "weight (5,) vs running_mean"),
        (lambda sd: sd.update({"7.running_mean": torch.zeros(32, dtype=torch.int64)}), "int64"),
        (lambda sd: sd.pop("7.running_var"), "no running_var"),
    ],
)
def test_a_malformed_bn_group_is_a_finding_on_that_layer(
    tmp_path: Path, mlp: nn.Module, plant: Any, says: str
) -> None:
    sd = dict(mlp.state_dict())
    plant(sd)
    ckpt = tmp_path / "mlp.pt"
    torch.save(sd, ckpt)
    result = CliRunner().invoke(app, ["check", str(ckpt), "-f", "json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert [r["name"] for r in doc["layers"]] == BN  # in key order, the broken one in place
    found = {r["name"]: [f for f in r["findings"]] for r in doc["layers"] if r["findings"]}
    assert list(found) == ["7"] and [f["code"] for f in found["7"]] == ["not-audited"]
    assert found["7"][0]["severity"] == "fail" and says in found["7"][0]["message"]
    assert found["7"][0]["hint"]
    assert any("1 of 6 key groups" in n for n in doc["summary"]["notes"])


def test_only_malformed_groups_exit_1_not_3(tmp_path: Path) -> None:
    """Running stats that are not BN-shaped are something to audit: not 'nothing to audit'."""
    ckpt = tmp_path / "odd.pt"
    torch.save(
        {
            "norm.running_mean": torch.zeros(3, 8),
            "norm.running_var": torch.ones(3, 8),
            "norm.num_batches_tracked": torch.tensor(5),
        },
        ckpt,
    )
    result = CliRunner().invoke(app, ["check", str(ckpt)])
    assert result.exit_code == 1, result.output
    assert "not-audited" in result.stdout


def test_every_report_format_renders_a_static_report(mlp: nn.Module) -> None:
    plant(mlp)
    report = audit_state_dict(mlp.state_dict(), checkpoint="mlp.pt", sha256="ab" * 32)
    table = render(report, Format.TABLE)
    assert "static audit" in table and "init-stats" in table
    assert f"sha256 {'ab' * 6}…" in table  # shortened on screen, in full when wide
    assert "ab" * 32 in render(report, Format.TABLE, width=None)
    assert "static checks only" in table.splitlines()[-1]
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
