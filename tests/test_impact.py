"""Output impact of recalibrated statistics, attribution, the output gate, recalibration."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnaudit import Severity, audit
from bnaudit.demo import PLANTED_LAYER, plant_stale
from bnaudit.recalibrate.recalibration import apply, recalibrate, updated_state_dict
from bnaudit.verdict.results import MODEL
from tests import nets


def images(batch: int = 32, count: int = 4, seed: int = 7) -> list[torch.Tensor]:
    return list(torch.split(nets.make_images(batch * count, seed=seed), batch))


@pytest.fixture
def stale_cnn(healthy_cnn: nn.Module) -> nn.Module:
    plant_stale(healthy_cnn)
    return healthy_cnn


def test_planted_stale_layer_changes_the_output(stale_cnn, healthy_cnn_pristine) -> None:
    stale = audit(stale_cnn, images(), max_output_change=0.05)
    healthy = audit(healthy_cnn_pristine, images(), max_output_change=0.05)
    assert stale.impact is not None and healthy.impact is not None
    assert stale.impact.rel_l2 > 0.2 > 0.05 > healthy.impact.rel_l2
    assert stale.impact.top1_agreement is not None and stale.impact.top1_agreement < 0.95
    assert [(f.layer, f.code) for f in stale.model_findings] == [(MODEL, "output-change")]
    assert not stale.passed and healthy.passed
    assert healthy.model_findings == ()


def test_gate_is_off_by_default(stale_cnn) -> None:
    report = audit(stale_cnn, images(), fail_on="never")
    assert report.model_findings == ()


def test_attribution_names_the_layer_that_matters(stale_cnn) -> None:
    report = audit(stale_cnn, images(), attribution=True)
    alone = report.impact.per_layer
    assert max(alone, key=alone.get) == PLANTED_LAYER
    others = [v for k, v in alone.items() if k != PLANTED_LAYER]
    assert alone[PLANTED_LAYER] > 10 * max(others, default=0)
    assert report.layer(PLANTED_LAYER).metrics.output_change_alone == alone[PLANTED_LAYER]


def test_impact_reuses_the_eval_outputs(stale_cnn) -> None:
    kept = audit(stale_cnn, images(count=3))
    recomputed = audit(stale_cnn, images(count=3), output_budget_mb=0)
    # The planted layer's disagreement is local, which decides: the output's confidence is not
    # measured (it would cost passes of its own).
    assert kept.impact.confidence is None
    assert kept.impact.forward_passes == 3  # one recalibrated pass per batch
    assert recomputed.impact.forward_passes == 6  # the stored-stat outputs run again
    assert kept.impact.rel_l2 == pytest.approx(recomputed.impact.rel_l2, rel=1e-6)
    assert kept.forward_passes == 2 * 3 + 3  # audit, impact (the fold check rides along)


def test_impact_from_a_one_shot_iterator(stale_cnn) -> None:
    listed = audit(stale_cnn, images())
    streamed = audit(stale_cnn, iter(images()))
    assert streamed.impact.rel_l2 == pytest.approx(listed.impact.rel_l2, rel=1e-9)


def test_impact_leaves_the_model_unchanged(stale_cnn) -> None:
    before = {k: v.clone() for k, v in stale_cnn.state_dict().items()}
    audit(stale_cnn, images(), attribution=True, regime="eval")
    after = stale_cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_recalibration_fixes_a_stale_layer(stale_cnn) -> None:
    r = recalibrate(stale_cnn, images(count=24, seed=3))
    assert r.batches == 24 and set(r.counts.values()) == {24}
    fixed = copy.deepcopy(stale_cnn)
    apply(fixed, r)
    # The output change includes the sampling noise of the audit's own 12 batches.
    report = audit(fixed, images(count=12, seed=9), max_output_change=0.05)
    assert report.passed, [f.message for f in report.findings if f.severity >= Severity.WARN]
    assert {f.code for f in report.findings} <= {"momentum-warmup"}  # T = 8 batches averaged


def test_recalibrating_a_healthy_model_changes_little(healthy_cnn) -> None:
    r = recalibrate(healthy_cnn, images(count=8, seed=3))
    for name, (mean, var) in r.stats.items():
        layer = healthy_cnn.get_submodule(name)
        sd = layer.running_var.sqrt()
        assert ((mean - layer.running_mean).abs() / sd).max() < 0.25, name
        assert (var / layer.running_var).log().abs().max() < 0.3, name


def test_updated_state_dict_changes_only_running_stats(stale_cnn) -> None:
    r = recalibrate(stale_cnn, images(), layers=("layer2.*",))
    assert set(r.stats) == {"layer2.bn1", "layer2.bn2", "layer2.shortcut.1"}
    sd = stale_cnn.state_dict()
    new = updated_state_dict(sd, r)
    changed = {k for k in sd if not torch.equal(sd[k], new[k])}
    assert changed <= {
        f"{n}.{b}" for n in r.stats for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert "layer2.bn1.running_mean" in changed
    assert all(new[k] is sd[k] for k in sd if k not in changed)
    model = nets.build_cnn()
    model.load_state_dict(new, strict=True)


def test_eval_regime_closes_the_train_eval_gap() -> None:
    torch.manual_seed(0)
    model = nets.build_mlp(depth=6)
    nets.calibrate(model, nets.mlp_data(2000 * 4, seed=1), 4)
    batches = list(torch.split(nets.mlp_data(4 * 150, seed=5), 4))
    before = audit(model, batches)
    gap = {f.layer for f in before.findings if f.code == "train-eval-gap"}
    assert gap and not {f.layer for f in before.findings if f.code == "stale-stats"}
    r = recalibrate(model, batches, regime="eval")
    # one pass per BN level, and one more to confirm: at most depth + 1 after the audit's two
    assert r.forward_passes <= (2 + 6 + 1) * len(batches)
    fixed = copy.deepcopy(model)
    apply(fixed, r)
    as_deployed = audit(fixed, batches, regime="eval")
    assert not {f.layer for f in as_deployed.findings if f.code == "stale-stats"}
    deepest = "16"
    assert before.layer(deepest).metrics.eval.drift.fraction >= 0.3
    assert as_deployed.layer(deepest).metrics.train.drift.fraction < 0.1  # judged on eval inputs
    assert as_deployed.layer(deepest).metrics.eval.drift.judged == "n/a: regime eval"
