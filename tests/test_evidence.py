"""Labels as evidence: the task metric with stored and with cross-fitted recalibrated
statistics, and `bnaudit recalibrate` refusing a recalibration that measurably hurts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from bnaudit.check.audit import audit
from bnaudit.cli import app
from bnaudit.inputs.calls import Call
from bnaudit.measure.evidence import measure, top1
from bnaudit.measure.impact import TOP1
from bnaudit.verdict.results import Severity
from tests import labelled

LABELLED = Path(labelled.__file__).resolve()
runner = CliRunner()


@pytest.fixture(scope="module")
def healthy() -> nn.Module:
    return labelled.trained(frozen_stats=False)


@pytest.fixture(scope="module")
def frozen() -> nn.Module:
    return labelled.trained(frozen_stats=True, seed=1)


def test_healthy_model_with_labels_reports_accuracy_not_worse(healthy: nn.Module) -> None:
    x, y = labelled.task(2000, 5)
    report = audit(healthy, labelled.loader())
    assert report.passed
    e = report.impact.evidence if report.impact else None
    assert e is not None and e.metric == TOP1 and e.samples == 512 and e.batches == 16
    # The stored-statistics accuracy is the model's real accuracy on these batches.
    assert abs(e.stored - labelled.accuracy(healthy, *labelled.task(512, 123))) < 1e-12
    assert abs(e.stored - labelled.accuracy(healthy, x, y)) < 0.05  # and close to held-out
    assert not e.worse and math.isfinite(e.stderr) and e.stderr > 0
    assert any("does not change top-1 accuracy beyond noise" in n for n in report.notes)


def test_frozen_on_purpose_recalibration_measured_worse(frozen: nn.Module) -> None:
    report = audit(frozen, labelled.loader())
    e = report.impact.evidence if report.impact else None
    assert e is not None and e.worse and e.difference < -0.05  # the fix would hurt
    assert any("lowers top-1 accuracy beyond noise" in n for n in report.notes)
    # Stale relative to these batches, said with the measurement, but not a FAIL of a model
    # whose weights fit its statistics.
    stale = [f for f in report.findings if f.code == "stale-stats"]
    assert len(stale) == 2 and all(f.severity is Severity.WARN for f in stale)
    assert all("lowers top-1 accuracy" in f.message for f in stale)
    assert all("do not recalibrate" in f.hint for f in stale)
    assert report.passed and not audit(frozen, labelled.loader(), fail_on="warn").passed
    # Without labels nothing says the statistics are stale rather than frozen in on purpose
    # (recalibrating makes this model's output less confident): a warning naming the risk.
    without_labels = audit(frozen, [x for x, _ in labelled.loader()])
    unlabelled = [f for f in without_labels.findings if f.code == "stale-stats"]
    assert {f.severity for f in unlabelled} == {Severity.WARN}
    assert all("trained with frozen statistics" in f.hint for f in unlabelled)


def _save(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def test_recalibrate_refuses_a_fix_that_hurts_without_force(
    frozen: nn.Module, tmp_path: Path
) -> None:
    ckpt = _save(frozen, tmp_path / "frozen.pt")
    out = tmp_path / "fixed.pt"
    args = ["recalibrate", str(ckpt), "--model", f"{LABELLED}:build"]
    args += ["--data", f"{LABELLED}:loader", "-o", str(out)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "not written" in refused.output and "--force" in refused.output
    assert not out.exists()
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code in (0, 1), forced.output
    assert out.exists() and "before writing: top-1 accuracy" in forced.output


def test_recalibrate_writes_a_healthy_model(healthy: nn.Module, tmp_path: Path) -> None:
    ckpt = _save(healthy, tmp_path / "healthy.pt")
    out = tmp_path / "fixed.pt"
    args = ["recalibrate", str(ckpt), "--model", f"{LABELLED}:build"]
    result = runner.invoke(app, [*args, "--data", f"{LABELLED}:loader", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_custom_metric_from_a_file(healthy: nn.Module, tmp_path: Path) -> None:
    metric = tmp_path / "metric.py"
    metric.write_text(
        "import torch.nn.functional as F\n"
        "def neg_loss(outputs, labels):\n"
        "    return -float(F.cross_entropy(outputs, labels))\n",
        encoding="utf-8",
    )
    ckpt = _save(healthy, tmp_path / "healthy.pt")
    args = ["check", str(ckpt), "--model", f"{LABELLED}:build", "--data", f"{LABELLED}:loader"]
    result = runner.invoke(app, [*args, "--metric", f"{metric}:neg_loss"])
    assert result.exit_code == 0, result.output
    # The notes are wrapped to the terminal's width: compare with the line breaks undone.
    assert f"{metric}:neg_loss on 512 labelled samples" in " ".join(result.output.split())


class Shift(nn.Module):
    """One BN; its output mean is how far the batch is from the running mean."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(1, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)


def test_cross_fitting_scores_each_batch_with_the_other_halfs_statistics() -> None:
    """In-sample recalibration would centre every batch exactly (a perfect score); cross-fitted,
    a batch is scored with the statistics of the other half, and the score says so."""
    model = Shift().eval()
    means = [0.0, 10.0, 2.0, 12.0]  # even positions fit the odd ones and the reverse
    gen = torch.Generator().manual_seed(0)
    calls = []
    for m in means:
        x = m + torch.randn(64, 1, generator=gen)
        calls.append(Call((x,), {}, torch.zeros(64, dtype=torch.long)))

    def centred(outputs: Tensor, labels: Tensor) -> float:  # higher is better: 0 is perfect
        return -abs(float(outputs.mean()))

    layers = {"bn": model.bn}
    e = measure(model, calls, layers, ["bn"], None, regime="train", metric=centred, metric_name="c")
    xs = [c.args[0] for c in calls]
    even = torch.cat(xs[0::2]), [xs[0], xs[2]]
    odd = torch.cat(xs[1::2]), [xs[1], xs[3]]

    def scored(x: Tensor, fit: list[Tensor]) -> float:
        mean = sum(float(b.mean()) for b in fit) / len(fit)
        var = sum(float(b.var()) for b in fit) / len(fit)  # unbiased, as a running var
        return -abs(float(x.mean()) - mean) / math.sqrt(var + model.bn.eps)

    want = [scored(xs[i], odd[1] if i % 2 == 0 else even[1]) for i in range(4)]
    assert e.recalibrated == pytest.approx(sum(want) / 4, rel=1e-6)
    assert e.recalibrated < -3  # far from the in-sample score of about 0
    assert model.bn.running_mean.item() == 0.0  # the model is left as it was


def test_top1_counts_correct_rows() -> None:
    scores = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    assert top1(scores, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert math.isnan(top1(torch.zeros(3), torch.tensor([0, 1, 1])))


def test_no_labels_no_evidence_and_metric_without_labels_says_so(healthy: nn.Module) -> None:
    x, _ = labelled.task(128, 2)
    plain = audit(healthy, list(x.split(32)))
    assert plain.impact is not None and plain.impact.evidence is None
    asked = audit(healthy, list(x.split(32)), metric=lambda o, y: 0.0, metric_name="m")
    assert any("--metric not measured" in n for n in asked.notes)
