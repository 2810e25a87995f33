"""Issue 24: no verdict or line of the report claims more than was measured.

A layer the forward never reached fails no check that needs it to run; top-1 agreement is for
class scores only; the verdict line says which data-dependent comparisons ran; the small-batch
rule counts independent values per channel, not samples; notes and fold reasons do not
contradict the findings; a module saved under two names is one module. Every model here is
built, and where it matters trained, at test time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import bnaudit
from bnaudit import Severity, audit
from bnaudit.check.static import audit_state_dict
from bnaudit.verdict.drift import MIN_EFFECTIVE_VALUES
from bnaudit.verdict.thresholds import JUDGED

FIRST_NOTE = "the first BN layer(s) to run already disagree with the data"


def verdict_line(report: bnaudit.AuditReport) -> str:
    return report.summary(width=None).splitlines()[-1]


def train_bn(model: nn.Module, batches: list[Tensor]) -> nn.Module:
    """Running stats as a cumulative average over `batches` (update_bn), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


# --- 1. a layer the forward never reached ------------------------------------------------------


class SpareBN(nn.Module):
    """A conv → BN classifier with a BN attribute its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.spare = nn.BatchNorm2d(8)  # defined, never used
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


def images(count: int, batch: int, seed: int, size: int = 12) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randn(count * batch, 3, size, size, generator=gen).split(batch))


def test_an_unused_bn_attribute_is_not_reached_and_fails_nothing() -> None:
    torch.manual_seed(0)
    model = train_bn(SpareBN(), images(40, 16, seed=1))
    report = audit(model, images(8, 16, seed=2))
    spare = report.layer("spare")
    assert [f.code for f in spare.findings] == ["not-reached"]
    (f,) = spare.findings
    assert f.severity == Severity.INFO and "may be unused" in f.hint
    assert "initial values" in f.message
    assert report.passed and report.layer("bn").verdict == "ok"
    # The static audit has no forward to tell: there the initial values still fail.
    static = audit_state_dict(model.state_dict())
    assert {f.code for f in static.layer("spare").findings} == {"init-stats"}


# --- 2. top-1 agreement for class scores only --------------------------------------------------


class PerFrame(nn.Module):
    """Per-frame logits [B, T] from a 1-D conv net: one score per frame, not per class."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.out = nn.Conv1d(8, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.bn(self.conv(x)).relu())[:, 0]


def frames(count: int, seed: int, labelled: bool) -> list[object]:
    gen = torch.Generator().manual_seed(seed)
    out: list[object] = []
    for _ in range(count):
        x = torch.randn(8, 1, 20, generator=gen)
        out.append({"x": x, "target": (x[:, 0] > 0).long()} if labelled else x)
    return out


def test_per_frame_logits_get_no_top1_line_and_unlabelled_outputs_say_what_is_assumed() -> None:
    torch.manual_seed(0)
    model = train_bn(PerFrame(), [b for b in frames(30, 1, labelled=False)])  # type: ignore[misc]
    with torch.no_grad():
        model.bn.running_mean += 0.5  # some output change to measure
    labelled = audit(model, frames(6, 2, labelled=True))
    assert labelled.impact is not None and labelled.impact.top1_agreement is None
    text = labelled.summary(width=None)
    assert "output impact of recalibrating" in text and "top-1" not in text
    unlabelled = audit(model, frames(6, 2, labelled=False))
    i = unlabelled.impact
    assert i is not None and i.top1_agreement is not None
    assert i.top1_basis == "assumes the [B, 20] output is class scores"
    assert f"({i.top1_basis})" in unlabelled.summary(width=None)


def test_class_labels_confirm_class_scores_and_one_column_is_none() -> None:
    torch.manual_seed(0)
    model = train_bn(SpareBN(), images(20, 16, seed=1))
    batches = [(x, torch.randint(0, 4, (x.shape[0],))) for x in images(4, 16, seed=3)]
    report = audit(model, batches)
    assert report.impact is not None and report.impact.top1_agreement is not None
    assert report.impact.top1_basis == ""
    model.head = nn.Linear(8, 1)  # one score per sample: an argmax over one column says nothing
    report = audit(model, images(4, 16, seed=3))
    assert report.impact is not None and report.impact.top1_agreement is None


# --- 3 and 4. small batches: values per channel, and a verdict line that says what ran ---------


class Net3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8)
        self.c2, self.b2 = nn.Conv3d(8, 8, 3, padding=1), nn.BatchNorm3d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.b2(self.c2(self.b1(self.c1(x)).relu())).relu()
        return self.head(y.mean((2, 3, 4)))


def volumes(count: int, seed: int, batch: int = 2) -> list[Tensor]:
    """Smooth random volumes (neighbouring voxels correlated), as 3-D models are fed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count * batch, 1, 16, 16, 16, generator=gen)
    x = nn.functional.avg_pool3d(x, 3, stride=1, padding=1) * 3
    return list(x.split(batch))


def test_a_3d_model_at_batch_2_is_judged_from_its_values_per_channel() -> None:
    torch.manual_seed(0)
    model = train_bn(Net3d(), volumes(60, seed=1))  # the statistics of batch-2 training
    report = audit(model, volumes(8, seed=2))
    for r in report.layers:
        assert r.metrics.seen.batch_size == 2 and r.metrics.seen.values_per_channel == 8192
        assert r.metrics.train.drift.judged == JUDGED, r.metrics.train.drift.judged
    assert report.passed, report.summary()
    assert any(n.startswith("stale-stats judged at batch size 2 < 3") for n in report.notes)
    assert "judged on" not in verdict_line(report)  # every comparison ran
    # The same model with its weights changed after the statistics were taken: the comparison,
    # judged at batch 2, finds the layer behind them (fail or warn is the evidence rule's call).
    with torch.no_grad():
        model.c2.weight.mul_(2.0)
        model.c2.bias.add_(0.5)
    stale = audit(model, volumes(8, seed=2))
    flagged = {r.name for r in stale.layers if any(f.code == "stale-stats" for f in r.findings)}
    assert flagged == {"b2"}, stale.summary()


def test_batches_worth_few_values_per_channel_are_not_judged_and_the_verdict_says_so() -> None:
    # Whole samples differ (an offset per sample): two of them are worth ~2 values per channel.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)

    def offset(count: int) -> list[Tensor]:
        x = torch.randn(count * 2, 1, 16, 16, 16, generator=gen) * 0.1
        x += 3 * torch.randn(count * 2, 1, 1, 1, 1, generator=gen)
        return list(x.split(2))

    model = train_bn(Net3d(), offset(60))
    report = audit(model, offset(8))
    first = report.layer("b1").metrics.train.drift.judged
    assert first.startswith("no: batch size 2 < 3 and ") and f"< {MIN_EFFECTIVE_VALUES}" in first
    assert report.layer("b2").metrics.train.drift.judged.startswith("no: batch size 2 < 3 and ")
    line = verdict_line(report)
    assert line.startswith("PASS: ") and "stale-stats" in line and "judged on none of 2" in line


# --- 5. notes and reasons that agree with the findings ------------------------------------------


def test_never_updated_first_layers_do_not_blame_the_data() -> None:
    torch.manual_seed(0)
    model = SpareBN().eval()  # saved before any training: every statistic is 0/1
    report = audit(model, [x * 3 + 2 for x in images(8, 16, seed=2)])
    assert {f.code for f in report.layer("bn").findings} >= {"init-stats", "stale-stats"}
    assert not any(n.startswith(FIRST_NOTE) for n in report.notes), report.notes


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.bn = nn.ConvTranspose2d(3, 8, 2, stride=2), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.up(x))


def test_a_bn_after_a_transposed_conv_is_told_so_in_the_fold_note() -> None:
    torch.manual_seed(0)
    model = train_bn(Upsampler(), images(10, 8, seed=1, size=6))
    report = audit(model, images(4, 8, seed=2, size=6), impact=False)
    (note,) = [n for n in report.notes if n.startswith("fold pairs")]
    assert "bn: its input is the output of up (ConvTranspose2d), which is not folded here" in note
    assert "not the output of a conv" not in note


# --- 6. one module under two names -------------------------------------------------------------


class TwoNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bn_again = self.bn  # the same module, registered again
        self.other = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.other(self.bn_again(self.conv(x)).relu()).mean((2, 3)))


@pytest.mark.parametrize("saved", [False, True])
def test_a_module_under_two_names_is_one_layer(tmp_path: Path, saved: bool) -> None:
    torch.manual_seed(0)
    model = train_bn(TwoNames(), images(20, 16, seed=1))
    state = model.state_dict()
    assert torch.equal(state["bn.running_var"], state["bn_again.running_var"])
    if saved:  # through a file, where the two keys share one storage record
        torch.save(state, tmp_path / "m.pt")
        state = torch.load(tmp_path / "m.pt", weights_only=True)
    static = audit_state_dict(state)
    assert [r.name for r in static.layers] == ["bn", "other"]
    assert any(
        n.startswith("bn and bn_again share their storage: one module") for n in static.notes
    )
    assert any("found from their state-dict keys" in n and "(2)" in n for n in static.notes)
    full = audit(model, images(4, 16, seed=2), impact=False)
    assert [r.name for r in full.layers] == ["bn", "other"]
    assert "bn is also registered as bn_again: one module under 2 names" in " ".join(full.notes)


def test_copies_of_fresh_layers_are_not_taken_for_one_module() -> None:
    # Two untrained layers hold the same initial values without being one module.
    state = {
        f"{n}.{k}": v.clone() for n in ("a", "b") for k, v in nn.BatchNorm2d(4).state_dict().items()
    }
    assert [r.name for r in audit_state_dict(state).layers] == ["a", "b"]
    trained = {k: v + 0.5 if "running_mean" in k else v for k, v in state.items()}
    assert [r.name for r in audit_state_dict(trained).layers] == ["a"]  # byte-identical copies
    assert any("hold byte-identical tensors" in n for n in audit_state_dict(trained).notes)
