"""A training checkpoint's BN counters against its step count, through `bnaudit check` as a
user runs it: checkpoints saved after real training loops built here, and hostile step counts
that must end in one clear line or a finding, never a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from bnaudit.checkpoint.training import as_count, find_step_count
from bnaudit.cli import app
from tests.training import BN, Net, train

MODEL = str(Path(__file__).with_name("training.py")) + ":Net"


def check(*args: Any) -> tuple[int, dict[str, Any], str]:
    """Exit code, the JSON report (empty when none) and stderr of `bnaudit check ARGS -f json`."""
    result = CliRunner().invoke(app, ["check", *map(str, args), "-f", "json", "--fail-on", "warn"])
    assert isinstance(result.exception, SystemExit) or result.exception is None, result.exception
    report = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    return result.exit_code, report, result.stderr


def found(report: dict[str, Any]) -> set[tuple[str, str]]:
    out = {(layer["name"], f["code"]) for layer in report["layers"] for f in layer["findings"]}
    out |= {("<model>", f["code"]) for f in report["summary"]["model_findings"]}
    return out


def trained(steps: int = 4, **net: Any) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net(**net)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    train(model, optimizer, steps)
    return model, optimizer


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """Adam after 4 steps of a loop that checkpoints block 1: a training checkpoint."""
    model, optimizer = trained(checkpointed=(1,), use_reentrant=False)
    data = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0}
    path = tmp_path_factory.mktemp("ckpt") / "train.pt"
    torch.save(data, path)
    return path, data


def test_adam_steps_find_the_double_update_of_the_checkpointed_layer_statically(
    checkpointed,
) -> None:
    path, _ = checkpointed
    code, report, _ = check(path)
    assert code == 1 and found(report) == {("blocks.1.1", "double-update")}
    f = next(layer for layer in report["layers"] if layer["name"] == "blocks.1.1")["findings"][0]
    assert (
        f["value"] == 2.0
        and "num_batches_tracked = 8, 2 times the 4 optimizer steps" in (f["message"])
    )
    assert any("training step count 4" in n for n in report["summary"]["notes"])


def test_the_full_audit_compares_the_counters_too(checkpointed) -> None:
    path, _ = checkpointed
    code, report, _ = check(path, "--model", MODEL, "--input-shape", "8x3x8x8")
    assert code == 1 and ("blocks.1.1", "double-update") in found(report)
    assert not {c for name, c in found(report) if name != "blocks.1.1"} & {"double-update"}


def test_declared_accumulation_moves_the_expected_count(tmp_path, checkpointed) -> None:
    path, _ = checkpointed
    code, report, _ = check(path, "--accumulate", "2")
    # 4 steps x 2 micro-batches: blocks.1.1 (8) fits; the others (4) updated in half of them.
    # That two layers agree on 4 does not make the one on the step count wrong.
    assert ("blocks.1.1", "double-update") not in found(report)
    assert found(report) == {("blocks.0.1", "no-update"), ("blocks.2.1", "no-update")}
    assert code == 1


def test_eval_left_on_leaves_counters_at_zero_after_the_steps(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    train(model, optimizer, 3)
    path = tmp_path / "eval.pt"
    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    code, report, _ = check(path)
    # init-stats says the statistics are the initial ones; no-update says why, with the steps.
    want = {(name, code) for name in BN for code in ("no-update", "init-stats")}
    assert code == 1 and found(report) == want


def test_a_healthy_lightning_checkpoint_passes_on_global_step(tmp_path) -> None:
    model, _ = trained(steps=3)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "global_step": 3, "epoch": 0}, path)
    code, report, _ = check(path)
    assert code == 0 and found(report) == set()
    assert any("Lightning's 'global_step'" in n for n in report["summary"]["notes"])


def test_an_epoch_needs_the_steps_per_epoch(tmp_path) -> None:
    model, _ = trained(steps=3)
    path = tmp_path / "epoch.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    code, report, _ = check(path)
    assert code == 0 and any("--steps-per-epoch" in n for n in report["summary"]["notes"])
    code, report, _ = check(path, "--steps-per-epoch", "1")
    assert code == 0 and found(report) == set()
    code, report, _ = check(path, "--steps-per-epoch", "2")  # 6 steps: counters at half
    assert code == 1 and found(report) == {(name, "no-update") for name in BN}


def test_no_step_count_is_said_in_a_note(tmp_path) -> None:
    model, _ = trained(steps=2)
    path = tmp_path / "nostep.pt"
    torch.save({"model": model.state_dict(), "note": "hello"}, path)
    code, report, _ = check(path)
    assert code == 0 and any("no training step count" in n for n in report["summary"]["notes"])


def test_a_layer_that_disagrees_with_the_rest_is_found_without_a_step_count(tmp_path) -> None:
    model, _ = trained(steps=4)
    sd = model.state_dict()
    sd["blocks.1.1.num_batches_tracked"] = torch.tensor(1)  # frozen after the first step
    path = tmp_path / "odd.pt"
    torch.save({"model": sd, "note": "no step"}, path)
    code, report, _ = check(path)
    assert code == 1 and found(report) == {("blocks.1.1", "no-update")}


HOSTILE = {
    "a string": "100",
    "negative": -3,
    "NaN": math.nan,
    "huge": 10**30,
    "a fraction": 2.5,
    "a tensor of wrong shape": torch.tensor([4.0, 4.0]),
    "a NaN tensor": torch.tensor(math.nan),
    "a bool": True,
    "a list": [1, 2],
}


@pytest.mark.parametrize("where", ["optimizer", "top-level"])
@pytest.mark.parametrize("what", list(HOSTILE))
def test_a_hostile_step_count_is_a_finding_never_a_traceback(tmp_path, checkpointed, what, where):
    _, data = checkpointed
    data = {**data, "optimizer": json.loads(json.dumps({"state": {}, "param_groups": []}))}
    value = HOSTILE[what]
    if where == "optimizer":
        data["optimizer"] = {"state": {0: {"step": value}}, "param_groups": [{"params": [0]}]}
    else:
        data = {"model": data["model"], "step": value}
    path = tmp_path / "hostile.pt"
    torch.save(data, path)
    code, report, stderr = check(path)
    assert "Traceback" not in stderr
    assert code == 1 and ("<model>", "bad-counter") in found(report)
    message = report["summary"]["model_findings"][0]["message"]
    assert "not compared" in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("option", ["--steps-per-epoch", "--accumulate"])
def test_a_bad_option_value_is_one_line_and_exit_2(checkpointed, option) -> None:
    path, _ = checkpointed
    code, report, stderr = check(path, option, "0")
    assert code == 2 and report == {}
    assert len(stderr.strip().splitlines()) == 1 and ">= 1" in stderr


@pytest.mark.parametrize(
    ("value", "count"),
    [(7, 7), (7.0, 7), (torch.tensor(7.0), 7), (torch.tensor([7]), 7), (0, 0)],
)
def test_counts_in_every_form_torch_saves_them(value, count) -> None:
    assert as_count(value) == (count, "")


def test_the_largest_per_parameter_adam_step_is_the_count() -> None:
    state = {"state": {0: {"step": torch.tensor(3.0)}, 1: {"step": torch.tensor(9.0)}}}
    found_count = find_step_count({"opt": {**state, "param_groups": []}, "model": {}})
    assert found_count is not None and found_count.steps == 9
    assert find_step_count({"w": torch.zeros(1)}) is None  # a bare state dict
