"""`bnaudit diff`: every finding on exactly the layers where the training accident put it.

Each case is generated at test time from one trained base model: a copy fine-tuned with BN in
eval mode, a copy whose frozen backbone still ran in train mode, a recalibrated copy, EMA and
raw weights in one timm-style file, checkpoints with other layers, and hostile files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import bnaudit
from bnaudit.cli import app
from bnaudit.compare.changes import DiffReport, identical, relative_change
from bnaudit.compare.render import fitted_table
from bnaudit.measure.upstream import ORDER, TRACED
from bnaudit.verdict.codes import DIFF_CODES, DIFF_HINTS, DIFF_SITUATION_HINTS

SPEC = "tests.test_diff:build_net"
BRANCHES_SPEC = "tests.test_diff:Branches"
BN = ("stem.1", "block1.1", "block2.1", "head.2")
BACKBONE = ("stem.1", "block1.1")
README = Path(__file__).resolve().parents[1] / "README.md"
DOC = Path(__file__).resolve().parents[1] / "docs" / "diff.md"
FINDINGS = DOC.parent / "findings.md"


class Net(nn.Module):
    """stem → block1 → block2 → head, each a weight layer then BN (registration = forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 5), nn.BatchNorm1d(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.block1(x))
        x = torch.relu(self.block2(x))
        return self.head(x)


def build_net() -> nn.Module:
    torch.manual_seed(0)
    return Net()


class Branches(nn.Module):
    """Two parallel branches: registration order puts branch a 'before' branch b."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def batches(count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 6, 6, generator=g) * 2 + 1 for _ in range(count)]


def train(model: nn.Module, steps: int, seed: int, *, bn_train: bool) -> None:
    """SGD on the parameters that require grad; BN layers in train mode or in eval mode."""
    model.train(bn_train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for x in batches(steps, seed):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def base() -> nn.Module:
    model = build_net()
    train(model, 20, seed=1, bn_train=True)  # T = 20
    return model


def sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def eval_finetuned(base: nn.Module) -> nn.Module:
    """The stem frozen, everything after it fine-tuned with BN in eval mode."""
    model = copy.deepcopy(base)
    for p in model.stem.parameters():
        p.requires_grad_(False)
    train(model, 5, seed=2, bn_train=False)
    return model


def frozen_backbone(base: nn.Module) -> nn.Module:
    """stem and block1 frozen with requires_grad=False, yet trained in train mode."""
    model = copy.deepcopy(base)
    for part in (model.stem, model.block1):
        for p in part.parameters():
            p.requires_grad_(False)
    train(model, 5, seed=3, bn_train=True)
    return model


def recalibrated(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    torch.optim.swa_utils.update_bn(batches(4, seed=4), model)  # T = 4 batches averaged
    return model.eval()


def codes(report: DiffReport) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report.findings:
        out.setdefault(f.code, set()).add(f.layer)
    return out


def invoke(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def save(tmp_path: Path, name: str, obj: object) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


# --- the findings -----------------------------------------------------------------------------


def test_eval_mode_finetune_is_stale_exactly_behind_changed_weights(base: nn.Module) -> None:
    tuned = eval_finetuned(base)
    report = bnaudit.diff(sd(base), sd(tuned))
    # The stem's conv was frozen: its BN sees the same input; every later one does not.
    assert codes(report) == {"stats-not-updated": {"block1.1", "block2.1", "head.2"}}
    assert not report.passed and report.verdict == "fail"
    stem = report.layer("stem.1").metrics
    assert stem.change == "identical" and stem.upstream_changed == 0
    block = report.layer("block1.1").metrics
    assert block.mean_changed is False and block.var_changed is False
    assert block.weight_changed and block.change == "affine"  # its own gamma/beta were tuned
    assert block.upstream_first_changed == "block1.0.weight"
    assert block.t_base == block.t_new == 20
    with_model = bnaudit.diff(sd(base), sd(tuned), model=build_net())
    assert with_model.upstream == TRACED
    assert codes(with_model) == codes(report)
    assert with_model.layer("block2.1").metrics.fed_by == "block2.0"
    assert with_model.layer("head.2").metrics.fed_by == "head.1"


def test_eval_mode_finetune_cli_exits_1(tmp_path: Path, base: nn.Module) -> None:
    a = save(tmp_path, "base.pt", base.state_dict())
    b = save(tmp_path, "tuned.pt", eval_finetuned(base).state_dict())
    out = tmp_path / "r.json"
    result = invoke("diff", a, b, "--json", out)
    assert result.exit_code == 1, result.output
    assert "stats-not-updated" in result.output
    doc = json.loads(out.read_text())
    failing = {layer["name"] for layer in doc["layers"] if layer["verdict"] == "fail"}
    assert failing == {"block1.1", "block2.1", "head.2"}
    assert doc["summary"]["upstream"] == ORDER
    with_model = invoke("diff", a, b, "--model", SPEC, "-f", "json")
    assert with_model.exit_code == 1, with_model.output
    assert json.loads(with_model.stdout)["summary"]["upstream"] == TRACED


def test_frozen_backbone_in_train_mode_warns_on_the_backbone_only(
    tmp_path: Path, base: nn.Module
) -> None:
    frozen = frozen_backbone(base)
    report = bnaudit.diff(sd(base), sd(frozen))
    assert codes(report) == {"frozen-stats-updated": set(BACKBONE)}
    for name in BACKBONE:
        m = report.layer(name).metrics
        assert m.change == "stats" and m.upstream_changed == 0 and m.t_delta == 5
        assert m.mean_shift_max > 0
    assert report.layer("block2.1").metrics.change == "stats+affine"
    assert report.passed  # a warning: the default gate passes
    a = save(tmp_path, "base.pt", base.state_dict())
    b = save(tmp_path, "frozen.pt", frozen.state_dict())
    assert invoke("diff", a, b).exit_code == 0
    assert invoke("diff", a, b, "--fail-on", "warn").exit_code == 1


def test_recalibrated_copy_does_not_fail(tmp_path: Path, base: nn.Module) -> None:
    report = bnaudit.diff(sd(base), sd(recalibrated(base)))
    assert codes(report) == {"counter-reset": set(BN)}
    assert {f.severity.label for f in report.findings} == {"info"}
    for name in BN:
        m = report.layer(name).metrics
        assert m.change == "stats" and (m.t_base, m.t_new) == (20, 4)
    a = save(tmp_path, "base.pt", base.state_dict())
    b = save(tmp_path, "recal.pt", recalibrated(base).state_dict())
    assert invoke("diff", a, b, "--fail-on", "warn").exit_code == 0


def test_frozen_batchnorm_behind_changed_weights_is_by_design(base: nn.Module) -> None:
    """FrozenBatchNorm-style layers (no counter) never update: the weights fit their stats."""
    old, new = sd(base), sd(eval_finetuned(base))
    for state in (old, new):
        del state["block1.1.num_batches_tracked"]
    report = bnaudit.diff(old, new)
    by_layer = {f.layer: f for f in report.findings}
    assert set(by_layer) == {"block1.1", "block2.1", "head.2"}
    frozen = by_layer["block1.1"]
    assert frozen.code == "stats-not-updated" and frozen.severity.label == "info"
    assert frozen.hint == DIFF_SITUATION_HINTS["stats-not-updated"]["frozen"]
    assert report.layer("block1.1").type == "FrozenBatchNorm-style"
    assert by_layer["block2.1"].severity.label == "fail"
    assert by_layer["block2.1"].hint == DIFF_SITUATION_HINTS["stats-not-updated"]["stale"]


def test_counter_reset_with_changed_weights_warns(base: nn.Module) -> None:
    new = sd(eval_finetuned(base))
    new["block2.1.num_batches_tracked"] = torch.tensor(0)
    report = bnaudit.diff(sd(base), new)
    (reset,) = [f for f in report.findings if f.code == "counter-reset"]
    assert reset.layer == "block2.1" and reset.severity.label == "warn"
    assert reset.hint == DIFF_SITUATION_HINTS["counter-reset"]["reset"]


def test_identical_checkpoints_pass_and_only_changed_hides_them(
    tmp_path: Path, base: nn.Module
) -> None:
    report = bnaudit.diff(sd(base), sd(base))
    assert report.passed and not report.findings
    assert report.changes()["identical"] == len(BN)
    a = save(tmp_path, "a.pt", base.state_dict())
    new = sd(base)
    new["head.2.running_mean"] = new["head.2.running_mean"] + 1
    b = save(tmp_path, "b.pt", new)
    shown = invoke("diff", a, b, "--only-changed", "-f", "csv")
    assert shown.exit_code == 0, shown.output  # stats moved, nothing upstream: frozen, a warning
    rows = [line.split(",")[0] for line in shown.stdout.strip().splitlines()[1:]]
    assert rows == ["head.2"]
    every = invoke("diff", a, b, "-f", "csv")
    assert len(every.stdout.strip().splitlines()) == 1 + len(BN)


# --- upstream from the dataflow versus the state-dict order -----------------------------------


def test_dataflow_tells_parallel_branches_apart() -> None:
    torch.manual_seed(0)
    model = Branches()
    model.train()
    for x in batches(3, seed=5):
        model(x)
    before = sd(model)
    with torch.no_grad():
        model.a[0].weight.mul_(1.5)  # branch a changed, no BN update anywhere
    after = sd(model)
    # Registration order puts a.0 before b.1, although b never sees it.
    by_order = bnaudit.diff(before, after)
    assert codes(by_order) == {"stats-not-updated": {"a.1", "b.1"}}
    assert any("pass --model for the dataflow" in n for n in by_order.notes)
    traced = bnaudit.diff(before, after, model=Branches())
    assert codes(traced) == {"stats-not-updated": {"a.1"}}
    assert traced.layer("b.1").metrics.upstream_weights == 2  # b.0.weight, b.0.bias


def test_untraceable_model_falls_back_to_state_dict_order(base: nn.Module) -> None:
    class Untraceable(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return super().forward(x)
            return super().forward(-x)

    torch.manual_seed(0)
    model = Untraceable()
    report = bnaudit.diff(sd(base), sd(eval_finetuned(base)), model=model)
    assert report.upstream == ORDER
    assert any(n.startswith("torch.fx could not trace the model") for n in report.notes)
    assert codes(report) == {"stats-not-updated": {"block1.1", "block2.1", "head.2"}}


# --- EMA and raw weights in one timm-style file -----------------------------------------------


def ema_of(raw: nn.Module, start: nn.Module, *, buffers: bool) -> dict[str, torch.Tensor]:
    """timm ModelEmaV2-style EMA of every float tensor (or of the parameters only)."""
    ema = sd(start)
    params = {n for n, _ in raw.named_parameters()}
    for k, v in raw.state_dict().items():
        if v.is_floating_point() and (buffers or k in params):
            ema[k] = 0.5 * ema[k] + 0.5 * v
        else:
            ema[k] = v.clone()
    return ema


def test_ema_versus_raw_in_one_timm_file(tmp_path: Path, base: nn.Module) -> None:
    raw = copy.deepcopy(base)
    train(raw, 5, seed=6, bn_train=True)
    ckpt = {
        "epoch": 3,
        "state_dict": sd(raw),
        "state_dict_ema": ema_of(raw, base, buffers=True),
        "optimizer": {"lr": 0.05},
    }
    path = save(tmp_path, "last.pth.tar", ckpt)
    result = invoke("diff", path, path, "--key", "state_dict", "--key-new", "state_dict_ema")
    assert result.exit_code == 0, result.output
    assert "stats+affine 4" in result.output  # every layer's weights and stats differ
    same = invoke("diff", path, path, "--key", "state_dict", "-f", "json")
    assert json.loads(same.stdout)["summary"]["changes"]["identical"] == len(BN)
    # EMA weights next to the raw model's statistics: stale by construction, everywhere.
    ckpt["state_dict_ema"] = ema_of(raw, base, buffers=False)
    path = save(tmp_path, "stale_ema.pth.tar", ckpt)
    result = invoke(
        "diff", path, path, "--key", "state_dict", "--key-new", "state_dict_ema", "-f", "json"
    )
    assert result.exit_code == 1, result.output
    flagged = {
        layer["name"]
        for layer in json.loads(result.stdout)["layers"]
        if any(f["code"] == "stats-not-updated" for f in layer["findings"])
    }
    assert flagged == set(BN)


def test_wrapper_prefixes_are_matched(base: nn.Module) -> None:
    ddp = {f"module.{k}": v for k, v in sd(base).items()}
    compiled = {f"_orig_mod.{k}": v for k, v in sd(eval_finetuned(base)).items()}
    report = bnaudit.diff(ddp, compiled)
    assert codes(report) == {"stats-not-updated": {"block1.1", "block2.1", "head.2"}}
    assert any("'module.'" in n for n in report.notes)
    assert any("'_orig_mod.'" in n for n in report.notes)


def test_every_format_and_container_loads_the_same(tmp_path: Path, base: nn.Module) -> None:
    from safetensors.torch import save_file

    tuned = eval_finetuned(base)
    a = save(
        tmp_path,
        "lightning.ckpt",
        {"state_dict": {f"model.{k}": v for k, v in sd(base).items()}, "epoch": 9},
    )
    b = tmp_path / "tuned.safetensors"
    save_file({k: v.contiguous() for k, v in sd(tuned).items()}, str(b))
    result = invoke("diff", a, b, "-f", "json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    failing = {x["name"] for x in doc["layers"] if x["verdict"] == "fail"}
    assert failing == {"block1.1", "block2.1", "head.2"}
    assert any("'model.'" in n for n in doc["summary"]["notes"])
    whole = save(tmp_path, "whole.pt", tuned)  # a pickled nn.Module: code
    refused = invoke("diff", a, whole)
    assert refused.exit_code == 2 and "--trust" in refused.stderr
    trusted = invoke("diff", save(tmp_path, "base_whole.pt", base), whole, "--trust", "-f", "json")
    assert trusted.exit_code == 1, trusted.output
    assert json.loads(trusted.stdout)["summary"]["upstream"] == TRACED  # the module's dataflow


# --- other layer sets, non-finite values ------------------------------------------------------


def test_mismatched_layer_sets_are_listed(tmp_path: Path, base: nn.Module) -> None:
    old = sd(base)
    new = {k: v for k, v in old.items() if not k.startswith("block2.")}
    new |= {k.replace("block2.", "block3."): v for k, v in old.items() if k.startswith("block2.")}
    for attr in ("weight", "bias", "running_mean", "running_var"):
        new[f"head.2.{attr}"] = torch.ones(6)
    report = bnaudit.diff(old, new)
    listed = {f.layer: f.message for f in report.findings if f.code == "unmatched-layer"}
    assert set(listed) == {"block2.1", "block3.1", "head.2"}
    assert "BASE only" in listed["block2.1"] and "NEW only" in listed["block3.1"]
    assert "(5,) in BASE, (6,) in NEW" in listed["head.2"]
    assert report.layer("head.2").metrics.change == "shape"
    a, b = save(tmp_path, "a.pt", old), save(tmp_path, "b.pt", new)
    result = invoke("diff", a, b, "-f", "json")
    assert result.exit_code == 0, result.output
    changes = json.loads(result.stdout)["summary"]["changes"]
    assert (changes["base only"], changes["new only"], changes["shape"]) == (1, 1, 1)


def test_nonfinite_statistics_are_reported_not_crashed(tmp_path: Path, base: nn.Module) -> None:
    new = sd(base)
    new["block1.1.running_var"][2] = math.nan
    report = bnaudit.diff(sd(base), new)
    m = report.layer("block1.1").metrics
    assert m.var_changed and m.nonfinite == 1 and math.isnan(m.log_var_max)
    assert any("non-finite values in 1 layers (block1.1)" in n for n in report.notes)
    out = tmp_path / "r.json"
    a, b = save(tmp_path, "a.pt", base.state_dict()), save(tmp_path, "b.pt", new)
    result = invoke("diff", a, b, "--json", out)
    assert result.exit_code == 0, result.output
    layer = next(x for x in json.loads(out.read_text())["layers"] if x["name"] == "block1.1")
    assert layer["metrics"]["log_var_max"] is None


def test_bit_identity_and_relative_change() -> None:
    x = torch.tensor([1.0, math.nan, 0.0])
    assert identical(x, x.clone())  # the same NaN bits
    assert not identical(x, torch.tensor([1.0, math.nan, -0.0]))  # -0.0 has other bits
    assert not identical(x, x.double())
    assert relative_change(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_change(torch.zeros(2), torch.tensor([3.0, 4.0])) == 1.0
    assert math.isnan(relative_change(x, x))


# --- the gate: config, ignores, baselines, reports --------------------------------------------


def test_ignores_and_baselines_apply(tmp_path: Path, base: nn.Module) -> None:
    a = save(tmp_path, "base.pt", base.state_dict())
    b = save(tmp_path, "tuned.pt", eval_finetuned(base).state_dict())
    config = tmp_path / "bnaudit.toml"
    config.write_text(
        '[tool.bnaudit]\nignore = [{layer = "block*", code = "stats-not-updated", '
        'reason = "recalibrated in the export step"}]\n'
    )
    result = invoke("diff", a, b, "--config", config, "-f", "json")
    assert result.exit_code == 1  # head.2 still counts
    doc = json.loads(result.stdout)
    assert doc["summary"]["findings"]["ignored"] == 2
    base_file = tmp_path / "baseline.json"
    assert invoke("diff", a, b, "--write-baseline", base_file).exit_code == 0
    assert invoke("diff", a, b, "--baseline", base_file).exit_code == 0
    worse = sd(eval_finetuned(base))
    worse["stem.0.weight"] = worse["stem.0.weight"] * 2  # now the stem is stale too
    c = save(tmp_path, "worse.pt", worse)
    result = invoke("diff", a, c, "--baseline", base_file)
    assert result.exit_code == 1
    assert "stem.1  stats-not-updated [new]" in result.output


def test_every_report_file_is_written(tmp_path: Path, base: nn.Module) -> None:
    new = sd(eval_finetuned(base))
    hostile = "<script>alert(1)</script>"
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        new[f"{hostile}.{attr}"] = new[f"head.2.{attr}"]
    a, b = save(tmp_path, "a.pt", base.state_dict()), save(tmp_path, "b.pt", new)
    files = {ext: tmp_path / f"r.{ext}" for ext in ("md", "csv", "json", "html")}
    result = invoke(
        "diff", a, b, "--markdown", files["md"], "--csv", files["csv"],
        "--json", files["json"], "--html", files["html"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "| block1.1" in files["md"].read_text()
    assert files["csv"].read_text().count("\n") == 1 + len(BN) + 1
    assert json.loads(files["json"].read_text())["summary"]["verdict"] == "fail"
    page = files["html"].read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    refused = invoke("diff", a, b, "--json", a)
    assert refused.exit_code == 2 and "over an input" in refused.output


def test_terminal_table_fits_the_terminal(tmp_path: Path, base: nn.Module) -> None:
    long = {
        f"backbone.stages.0.blocks.0.conv_bn.{k.rpartition('.')[2]}": v
        for k, v in sd(base).items()
        if k.startswith("stem.1.")
    }
    new = dict(long)
    new["backbone.stages.0.blocks.0.conv_bn.running_mean"] = torch.ones(8)
    report = bnaudit.diff(long, new)
    for width in (50, 60, 80):
        table = fitted_table(list(report.layers), width)
        assert max(len(line) for line in table.splitlines()) <= width, table
    assert "findings" in fitted_table(list(report.layers), 60)
    wide = fitted_table(list(report.layers), None)
    assert "gamma" in wide and "backbone.stages.0.blocks.0.conv_bn" in wide
    a, b = save(tmp_path, "a.pt", long), save(tmp_path, "b.pt", new)
    result = invoke("diff", a, b, env={"COLUMNS": "70"})
    table = result.stdout.split("\n\n")[0]
    assert max(len(line) for line in table.splitlines()) <= 70, table


# --- hostile and broken inputs ----------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d: d / "missing.pt", id="missing"),
        pytest.param(lambda d: d, id="directory"),
        pytest.param(lambda d: _write(d / "empty.pt", b""), id="empty"),
        pytest.param(lambda d: _write(d / "text.pt", b"hello, not a checkpoint\n"), id="text"),
        pytest.param(lambda d: _write(d / "pickle.pt", pickle.dumps(_Payload())), id="pickle"),
        pytest.param(lambda d: _truncated(d), id="truncated-zip"),
        pytest.param(lambda d: _code(d), id="pickled-code-in-zip"),
    ],
)
def test_hostile_new_checkpoint_exits_2(
    tmp_path: Path, base: nn.Module, make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    a = save(tmp_path, "base.pt", base.state_dict())
    bad = make(tmp_path)
    for args in ((a, bad), (bad, a)):
        result = invoke("diff", *args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnaudit: error: "), result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "pwned").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(d: Path) -> Path:
    path = d / "whole.pt"
    torch.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    return _write(d / "cut.pt", data[: len(data) // 2])


def _code(d: Path) -> Path:
    path = d / "code.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Payload()}, path)
    return path


def test_bad_keys_and_nothing_to_compare(tmp_path: Path, base: nn.Module) -> None:
    a = save(tmp_path, "a.pt", {"state_dict": base.state_dict()})
    result = invoke("diff", a, a, "--key-new", "state_dict_ema")
    assert result.exit_code == 2 and "--key state_dict_ema" in result.stderr
    plain = save(tmp_path, "plain.pt", {"fc.weight": torch.ones(2, 2)})
    result = invoke("diff", plain, plain)
    assert result.exit_code == 3 and "nothing to compare" in result.stderr
    other = tmp_path / "other.py"
    other.write_text("from torch import nn\ndef build():\n    return nn.Linear(2, 2)\n")
    result = invoke("diff", a, a, "--model", f"{other}:build")
    assert result.exit_code == 2 and "does not fit --model" in result.stderr


# --- the library, the docs, the console script ------------------------------------------------


def test_the_api_neither_changes_its_inputs_nor_the_model(base: nn.Module) -> None:
    a, b = sd(base), sd(eval_finetuned(base))
    a_copy, b_copy = copy.deepcopy(a), copy.deepcopy(b)
    model = build_net()
    before = sd(model)
    report = bnaudit.diff(a, b, model=model)
    assert isinstance(report, bnaudit.DiffReport) and not report
    for got, want in ((a, a_copy), (b, b_copy), (model.state_dict(), before)):
        assert got.keys() == want.keys() and all(identical(got[k], want[k]) for k in got)
    import bnaudit.compare.changes as module  # the package is not named diff: nothing hides it

    assert bnaudit.diff(a, b).verdict == "fail" and module.diff(a, a).verdict == "pass"
    frame = report.to_frame()
    assert list(frame["layer"]) == list(BN) and "mean_shift_max" in frame.columns


def test_diff_codes_are_documented_with_the_others() -> None:
    assert set(DIFF_CODES) == set(DIFF_HINTS) | set(DIFF_SITUATION_HINTS)
    readme, doc, table = README.read_text(), DOC.read_text(), FINDINGS.read_text()
    for code in DIFF_CODES:
        assert f"| `{code}` |" in table, code
        assert f"`{code}`" in doc, code
    assert "bnaudit diff" in readme and "docs/diff.md" in readme


def test_the_documented_example_is_real_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/diff.md's example, made again as it says, prints every line it shows."""
    from bnaudit import demo

    torch.manual_seed(0)
    model = demo.build_model()
    demo.calibrate(model, demo.make_images(50 * 32, seed=1), 32)
    torch.save(model.state_dict(), tmp_path / "epoch10.pt")
    demo.plant_stale(model)
    torch.save(model.state_dict(), tmp_path / "finetuned.pt")
    monkeypatch.chdir(tmp_path)
    command = "bnaudit diff epoch10.pt finetuned.pt --model bnaudit.demo:build_model"
    text = DOC.read_text()
    start = text.index(f"$ {command}\n") + len(command) + 3
    shown = text[start : text.index("```", start)].splitlines()
    result = invoke(*command.split()[1:], env={"COLUMNS": "100"})
    assert result.exit_code == 1
    missing = [line for line in shown if line != "..." and line not in result.stdout.splitlines()]
    assert missing == []
    assert len(shown) == 20  # the table, the summary and one finding, as shown


def test_console_script(tmp_path: Path, base: nn.Module) -> None:
    a = save(tmp_path, "base.pt", base.state_dict())
    b = save(tmp_path, "tuned.pt", eval_finetuned(base).state_dict())
    script = Path(sys.executable).parent / "bnaudit"
    done = subprocess.run(
        [str(script), "diff", str(a), str(b), "-q"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("bnaudit ") and "FAIL" in done.stdout
