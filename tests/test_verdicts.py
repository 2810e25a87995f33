"""Layer verdicts that hold on small layers and few batches, and hints that fit their messages.

The count rule (bnaudit.verdict.significance) is checked against independent references: closed
forms and the finite series of Student's t for integer degrees of freedom, exact binomial sums.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from bnaudit import audit
from bnaudit.cli import app
from bnaudit.demo import plant_stale
from bnaudit.measure import explain
from bnaudit.measure.impact import OutputImpact
from bnaudit.verdict import significance as S
from bnaudit.verdict.codes import CODES, HINTS, SITUATION_HINTS, hint
from bnaudit.verdict.findings import Thresholds, judge_layer, judge_model
from bnaudit.verdict.results import Severity
from tests import nets
from tests.reports import metrics, single_thread

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)
BATCH = 16  # the small models' training and audit batch size
WIDTH = 16  # C of their BN layers: a small layer
SEEDS = range(30)  # today's rule flipped 6 of these 30 between 4 and 16 batches
FIRST_NOTE = "the first BN layer(s) to run already disagree with the data"


# --- the pure rule -----------------------------------------------------------------------------


def t_tail_series(t: float, dof: int) -> float:
    """P(|T| > t) by the finite series for integer dof (Abramowitz & Stegun 26.7.3–4)."""
    theta = math.atan(t / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    if dof % 2:
        term = total = math.cos(theta)
        if dof == 1:
            total = 0.0
        for k in range(1, (dof - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        inside = 2 / math.pi * (theta + math.sin(theta) * total)
    else:
        term = total = 1.0
        for k in range(1, dof // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        inside = math.sin(theta) * total
    return 1.0 - inside


@pytest.mark.parametrize(
    ("t", "dof", "tail"),
    [
        (3.182446305284263, 3, 0.05),  # t tables: the 97.5 % quantile with 3 dof
        (2.228138851986274, 10, 0.05),
        (3.169272672616951, 10, 0.01),
        (12.70620473617471, 1, 0.05),
        (1.0, 1, 0.5),  # Cauchy: 1 - 2/pi·atan(1)
    ],
)
def test_t_tail_matches_tables(t: float, dof: int, tail: float) -> None:
    assert S.t_tail(t, dof) == pytest.approx(tail, rel=1e-9)


@SETTINGS
@given(t=st.floats(0.0, 60.0), dof=st.integers(1, 80))
def test_t_tail_matches_the_finite_series(t: float, dof: int) -> None:
    assert S.t_tail(t, dof) == pytest.approx(t_tail_series(t, dof), rel=1e-9, abs=1e-13)


def test_t_tail_closed_forms_and_normal_limit() -> None:
    for t in (0.5, 2.0, 4.0, 30.0):
        assert S.t_tail(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-12)
        assert S.t_tail(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert S.t_tail(4.0, math.inf) == pytest.approx(6.334248366623996e-05, rel=1e-12)
    assert S.t_tail(4.0, 1e7) == pytest.approx(S.normal_tail(4.0), rel=1e-5)
    with pytest.raises(ValueError, match="dof > 0"):
        S.t_tail(4.0, 0)


def binomial_tail_exact(k: int, n: int, p: Fraction) -> float:
    return float(sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1)))


@SETTINGS
@given(n=st.integers(1, 60), data=st.data(), p=st.fractions(Fraction(1, 10**5), Fraction(99, 100)))
def test_binomial_tail_matches_the_exact_sum(n: int, data: st.DataObject, p: Fraction) -> None:
    k = data.draw(st.integers(0, n + 1), label="k")
    exact = binomial_tail_exact(k, n, p)
    assert S.binomial_tail(k, n, float(p)) == pytest.approx(exact, rel=1e-9, abs=1e-300)


def test_off_probability_is_the_t_tail_for_both_tests_never_below_normal() -> None:
    # K = 4 batches: 3 dof, where a z of 4 is 440x more likely than for a normal.
    assert S.off_probability(4.0, 4) == pytest.approx(2 * t_tail_series(4.0, 3), rel=1e-12)
    assert S.off_probability(4.0, 4) > 400 * 2 * S.normal_tail(4.0)
    previous = 1.0
    for k in (2, 3, 4, 8, 16, 64, 256, 4096):
        p0 = S.off_probability(4.0, k)
        assert 2 * S.normal_tail(4.0) <= p0 < previous  # the floor, and it falls with K
        previous = p0
    assert S.off_probability(4.0, 1) == 1.0  # one batch says nothing about noise


def test_count_rule_minimum_is_the_share_and_at_least_two() -> None:
    rule = S.CountRule(fraction=0.1, alpha=1e-3)
    assert rule.minimum(30) == 3  # 0.1·30 is 3.0000000000000004 in floating point
    assert rule.minimum(16) == 2  # 1.6 channels: 2
    assert rule.minimum(4) == 2  # the share is 1: one channel is not a layer verdict
    assert rule.minimum(1) == 1  # a one-channel layer has only its channel
    assert rule.minimum(256) == 26
    assert S.CountRule(fraction=1.01, alpha=1e-3).minimum(16) == 17  # switched off


def test_count_rule_on_a_small_layer_at_4_and_16_batches() -> None:
    """2 of 16 channels is noise at K = 4 (t with 3 dof), evidence at K = 64; 16 of 16 never."""
    rule, z = S.CountRule(fraction=0.1, alpha=1e-3), 4.0
    at4 = S.noise_p(2, 16, 4, z)
    assert at4 == pytest.approx(
        binomial_tail_exact(2, 16, Fraction(2 * t_tail_series(z, 3))), rel=1e-9
    )
    assert at4 > 0.2 and not rule.holds(2, 16, at4)
    assert rule.holds(2, 16, S.noise_p(2, 16, 64, z))
    assert rule.holds(16, 16, S.noise_p(16, 16, 4, z))
    assert not rule.holds(1, 16, S.noise_p(1, 16, 4096, z))  # one channel never is
    assert rule.needed(16, 4, z) == 6
    assert rule.needed(16, 16, z) == 2
    for k in (2, 3, 4, 8):  # needed is the first count below alpha
        n = rule.needed(16, k, z)
        assert S.noise_p(n, 16, k, z) < 1e-3 <= S.noise_p(n - 1, 16, k, z)


def test_too_few_batches_for_a_few_channels() -> None:
    z, alpha = 4.0, 1e-3
    assert not S.judgeable(4, 2, z, alpha)  # all 4 off: p0^4 = 0.0095 with K = 2
    assert S.judgeable(4, 3, z, alpha)
    assert S.fewest_batches(4, z, alpha) == 3
    assert S.fewest_batches(16, z, alpha) == 2
    assert S.fewest_batches(1, z, alpha) == 26  # one channel: 2·P(|t_K-1| > 4) < 1e-3
    assert S.fewest_batches(1, 2.0, alpha) is None  # at z = 2 a normal alone is off 9 %
    assert S.CountRule(0.1, alpha).needed(4, 2, z) == 5  # above C: no count makes a verdict


# --- the rule on small models ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_mlp() -> nn.Module:
    """Two Linear-BN1d(16) blocks, healthy: running stats an EMA at the audit batch size."""
    with single_thread():
        torch.manual_seed(0)
        model = nets.build_mlp(depth=2, width=WIDTH)
        nets.calibrate(model, nets.mlp_data(400 * BATCH, seed=1), BATCH)
    return model.eval()


def verdicts(model: nn.Module, seed: int, count: int, **options: Any) -> dict[str, Any]:
    batches = list(torch.split(nets.mlp_data(BATCH * count, seed=100 + seed), BATCH))
    with single_thread():
        report = audit(model, batches, impact=False, fold=False, **options)
    return {
        r.name: (r.verdict, sorted({f.code for f in r.findings if f.counts})) for r in report.layers
    }


def test_healthy_small_layers_keep_their_verdict_from_4_to_16_batches(
    small_mlp: nn.Module,
) -> None:
    flips = {}
    for seed in SEEDS:
        few, many = verdicts(small_mlp, seed, 4), verdicts(small_mlp, seed, 16)
        if few != many:
            flips[seed] = (few, many)
    assert flips == {}
    for codes in (c for _, c in verdicts(small_mlp, 0, 4).values()):
        assert "stale-stats" not in codes and "train-eval-gap" not in codes


def test_a_planted_stale_small_layer_is_caught_with_4_and_16_batches(
    small_mlp: nn.Module,
) -> None:
    model = copy.deepcopy(small_mlp)
    with torch.no_grad():  # the Linear before BN "4" changes after calibration
        model[3].weight.mul_(1.3)
        model[3].bias.add_(0.3)
    for seed in SEEDS[:10]:
        for count in (4, 16):
            found = verdicts(model, seed, count)
            stale = {name for name, (_, codes) in found.items() if "stale-stats" in codes}
            assert stale == {"4"}, (seed, count, found)


def test_stale_alpha_is_the_bar_for_the_count(small_mlp: nn.Module) -> None:
    model = copy.deepcopy(small_mlp)
    with torch.no_grad():
        model[3].weight.mul_(1.3)
    batches = list(torch.split(nets.mlp_data(BATCH * 4, seed=5), BATCH))
    with single_thread():
        report = audit(model, batches, impact=False, fold=False)
        strict = audit(model, batches, impact=False, fold=False, stale_alpha=1e-40)
    m = report.layer("4").metrics
    assert m.train.drift.p == pytest.approx(
        S.noise_p(round(m.train.drift.fraction * 16), 16, 4, 4.0), rel=1e-12
    )
    assert m.train.drift.p < 1e-3 and "stale-stats" in {f.code for f in report.layer("4").findings}
    assert "stale-stats" not in {f.code for f in strict.layer("4").findings}
    assert strict.thresholds["stale_alpha"] == 1e-40


def test_too_few_batches_for_a_small_layer_is_said_not_judged() -> None:
    with single_thread():
        torch.manual_seed(0)
        model = nets.build_mlp(depth=1, width=4)
        nets.calibrate(model, nets.mlp_data(400 * BATCH, seed=1), BATCH)
        with torch.no_grad():  # even a planted defect is not a verdict from 2 batches
            model[0].weight.mul_(3.0)
        batches = list(torch.split(nets.mlp_data(BATCH * 3, seed=5), BATCH))
        two = audit(model.eval(), batches[:2], impact=False, fold=False)
        three = audit(model, batches, impact=False, fold=False)
    reason = "no: too few batches (K=2) for 4 channels, needs K >= 3"
    assert two.layer("1").metrics.train.drift.judged == reason
    assert two.layer("1").metrics.eval.drift.judged == reason
    assert "stale-stats" not in {f.code for f in two.findings}
    assert (
        "stale-stats not judged (too few batches (K=2) for 4 channels, needs K >= 3): 1"
        in two.notes
    )
    assert three.layer("1").metrics.train.drift.judged == "yes"
    assert "stale-stats" in {f.code for f in three.layer("1").findings}


def test_cli_takes_stale_alpha() -> None:
    result = CliRunner().invoke(app, ["config", "--stale-alpha", "0.01"])
    assert result.exit_code == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("stale-alpha"))
    assert line.startswith("stale-alpha = 0.01 ") and line.endswith("# command line")


# --- relative to these batches, and the first layers -------------------------------------------


class Reordered(nn.Module):
    """Registers its blocks in the opposite order to the one they run in."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH))
        self.early = nn.Sequential(nn.Linear(20, WIDTH), nn.BatchNorm1d(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(torch.relu(self.early(x)))


def test_stale_first_layer_notes_the_data_may_differ() -> None:
    with single_thread():
        torch.manual_seed(0)
        model = Reordered()
        nets.calibrate(model, nets.mlp_data(400 * BATCH, seed=1), BATCH)
        # The same inputs, normalised otherwise: nothing in the model changed.
        data = nets.mlp_data(BATCH * 8, seed=5) * 2.0 + 1.0
        report = audit(model.eval(), list(torch.split(data, BATCH)), impact=False, fold=False)
    notes = [n for n in report.notes if n.startswith(FIRST_NOTE)]
    assert notes == [
        f"{FIRST_NOTE} (early.1): the audit data may not be the training distribution "
        "(preprocessing, normalisation, domain); recalibrating to it changes the model"
    ]
    (stale,) = [f for f in report.findings if f.code == "stale-stats"]
    assert stale.layer == "early.1"  # the first to run, though registered second
    # Only the data changed: nothing says the statistics are stale, so a warning that says
    # what would decide (issue 24; it was a FAIL with a recalibration hint).
    assert stale.severity is Severity.WARN
    assert stale.hint == SITUATION_HINTS["stale-stats"]["unproven"]
    assert "no evidence that they are stale" in stale.message
    assert "relative to these batches" in stale.message
    assert "no BN layer that fits these batches runs before it" in stale.message


def test_stale_later_layer_says_relative_to_these_batches_without_the_note(
    healthy_cnn: nn.Module,
) -> None:
    plant_stale(healthy_cnn)  # layer2.bn1, behind the first layers, which fit
    batches = list(torch.split(nets.make_images(16 * 4, seed=7), 16))
    with single_thread():
        report = audit(healthy_cnn, batches, impact=False, fold=False)
    (stale,) = [f for f in report.findings if f.code == "stale-stats"]
    assert stale.layer == "layer2.bn1"
    assert "running stats do not describe the train-mode input, relative to these batches" in (
        stale.message
    )
    assert "32 of 32 channels (100%)" in stale.message
    # local: layer1.bn2 before it and layer2.bn2 after it fit these batches
    assert stale.severity is Severity.FAIL and "the disagreement is local" in stale.message
    assert stale.hint.startswith(SITUATION_HINTS["stale-stats"]["stale"]) and "update_bn" in (
        stale.hint
    )
    assert not any(n.startswith(FIRST_NOTE) for n in report.notes)


# --- every hint fits its message ---------------------------------------------------------------

STALE = {"stale_fraction": 1.0, "stale_p": 1e-20}  # 8 of 8 channels off, far beyond noise
FOLD = {"fold_with": "conv", "fold_checked": True, "fold_ratio": 0.1, "fold_int8_levels": 100.0}
EXPLAINED_AS = {  # bnaudit.measure.explain key → its hint's situation
    "unbiased": "unbiased",
    "running-in-train": "running-in-train",
    "batch-in-eval": "batch-in-eval",
    "eps-outside": "eps-outside",
    "eps": "eps",
    "no-affine": "no-affine",
    "per-sample": "per-sample",
    "batch-dim-only": "batch-dim-only",
    "channels-last": "channels-last",
    "float16": "half-rounding",
    "bfloat16": "half-rounding",
}


def explained(mode: str, key: str, ratio: float = 0.5) -> dict[str, Any]:
    return {
        f"recon_{mode}_ratio": 50.0,
        f"recon_{mode}_max_err": 1e-3,
        f"recon_{mode}_explanation": f"the {key} mistake",
        f"recon_{mode}_explanation_key": key,
        f"recon_{mode}_explanation_err": 1e-6,
        f"recon_{mode}_explanation_ratio": ratio,
    }


# (code, situation, metrics, judge_layer options, words the hint must have, must not have)
SITUATIONS: list[tuple[str, str, dict[str, Any], dict[str, Any], tuple[str, ...], tuple]] = [
    ("nonfinite", "values", {"nonfinite_values": 3}, {}, ("earlier checkpoint",), ()),
    ("nonfinite", "outputs", {"nonfinite_outputs": 5}, {}, ("finite inputs",), ("restore",)),
    ("bad-var", "negative", {"negative_var_channels": 1}, {}, ("never negative",), ()),
    ("bad-var", "zero", {"zero_var_channels": 1}, {}, ("zero",), ("negative",)),
    ("init-stats", "no-count", {"num_batches_tracked": 0}, {}, ("T = 0",), ("never ran",)),
    ("init-stats", "never-updated", {"initial_stats": True, "num_batches_tracked": 0}, {},
     ("never ran",), ()),
    ("init-stats", "reset", {"initial_stats": True}, {}, ("reset",), ("never ran",)),
    ("init-stats", "frozen",
     {"initial_stats": True, "kind": "frozen", "num_batches_tracked": None}, {},
     ("not loaded",), ("update_bn", "never ran")),
    ("momentum-warmup", "unverified",
     {"num_batches_tracked": 5, "init_weight": 0.59, "stale_judged": "no: static audit"},
     {"batches": 0}, ("audit with data",), ("nothing to fix",)),
    ("momentum-warmup", "undecided",
     {"num_batches_tracked": 5, "init_weight": 0.59, "stale_judged": "no: synthetic data"}, {},
     ("the message says",), ("nothing to fix", "an audit with data")),
    ("momentum-warmup", "verified",
     {"num_batches_tracked": 5, "init_weight": 0.59, "stale_fraction": 0.0, "stale_p": 1.0},
     {}, ("nothing to fix",), ("still carry",)),
    ("momentum-warmup", "stale",
     {"num_batches_tracked": 5, "init_weight": 0.59, **STALE}, {}, ("do not fit",),
     ("nothing to fix",)),
    ("recon-train", "undiagnosed", {"recon_train_ratio": 50.0}, {}, ("batch statistics",), ()),
    ("recon-train", "unexplained", explained("train", "unbiased", ratio=30.0), {},
     ("bnaudit show CHECKPOINT --layer L",), ()),
    ("recon-train", "activation", explained("train", "act:relu"), {}, ("hook",), ()),
    ("recon-train", "explained", explained("train", "a-future-mistake"), {}, ("names",), ()),
    ("recon-eval", "undiagnosed", {"recon_eval_ratio": 50.0}, {}, ("running statistics",), ()),
    ("recon-eval", "unexplained", explained("eval", "eps", ratio=30.0), {},
     ("bnaudit show CHECKPOINT --layer L",), ()),
    ("recon-eval", "activation", explained("eval", "act:relu"), {}, ("hook",), ()),
    ("recon-eval", "explained", explained("eval", "a-future-mistake"), {}, ("names",), ()),
    ("running-update", "stats", {"update_mean_ratio": 5.0, "update_var_ratio": 0.1}, {},
     ("(1-m)*old + m*batch",), ()),
    ("running-update", "counter",
     {"update_mean_ratio": 0.1, "update_var_ratio": 0.1, "update_count_errors": 2}, {},
     ("num_batches_tracked",), ("(1-m)*old",)),
    ("nonstandard-forward", "mismatch", {"recon_eval_ratio": 50.0}, {"overrides_forward": True},
     ("does not compute BN",), ("nothing to fix",)),
    ("nonstandard-forward", "variant", explained("train", "act:silu"),
     {"overrides_forward": True}, ("nothing to fix",), ()),
    ("nonstandard-forward", "plain", {}, {"overrides_forward": True}, ("plain BN",), ()),
    ("nonstandard-forward", "inside", {"measured_at": "input of act"},
     {"overrides_forward": True}, ("where it happens",), ("plain BN",)),
    ("nonstandard-forward", "unchecked", {"calls": 0}, {"overrides_forward": True},
     ("did not run",), ("plain BN",)),
    ("stale-stats", "unproven", STALE, {}, ("frozen statistics", "Labelled batches"),
     ("update_bn(loader",)),
    ("train-eval-gap", "gap", {"gap_fraction": 1.0, "gap_p": 1e-20}, {}, ("eval mode",), ()),
    ("train-eval-gap", "downstream", {"gap_fraction": 1.0, "gap_p": 1e-20},
     {"upstream_stale": ("stem.bn",)}, ("recalibrate stem.bn first",), ()),
    ("fold-risk", "float16", {**FOLD, "folded_weight_max": 1e6}, {}, ("float32",),
     ("per channel",)),
    ("fold-risk", "int8", {**FOLD, "fold_int8_levels": 2.0}, {}, ("per channel",),
     ("float32",)),
]  # fmt: skip
SITUATIONS += [
    (code, situation, explained(mode, key), {}, (), ())
    for code, mode in (("recon-train", "train"), ("recon-eval", "eval"))
    for key, situation in EXPLAINED_AS.items()
    if situation in SITUATION_HINTS[code]
]
SITUATIONS += [  # codes with one hint for all their messages
    ("tiny-var", "", {"max_amplification": 5000.0}, {}, ("gamma",), ()),
    ("var-bias", "", {"eval_scale": 0.9}, {}, ("values per channel",), ()),
    ("momentum-convention", "", {"momentum": 0.99}, {}, ("Keras",), ()),
    ("no-running-stats", "", {"track_running_stats": False}, {}, ("track_running_stats",), ()),
    ("not-reached", "", {"calls": 0}, {}, ("may be unused",), ()),
    ("fold-mismatch", "", {**FOLD, "fold_ratio": 5.0}, {}, ("folded",), ()),
    ("half-buffers", "", {"buffer_dtype": "float16"}, {}, ("float32",), ()),
    ("no-counter", "", {"num_batches_tracked": None}, {}, ("FrozenBatchNorm",), ()),
    (
        "bad-counter",
        "",
        {"num_batches_tracked": None, "counter_problem": "nan (torch.float32)"},
        {},
        ("load_state_dict",),
        (),
    ),
]


# A measured, healthy layer; each situation changes what makes it.
HEALTHY = {
    "recon_train_ratio": 0.1,
    "recon_eval_ratio": 0.1,
    "update_mean_ratio": 0.1,
    "update_var_ratio": 0.1,
    "init_weight": 0.0,
    "eval_scale": 1.0,
}


def judged(values: dict[str, Any], options: dict[str, Any]):
    m = metrics(**{**HEALTHY, **values})
    kwargs = {"type_name": "BatchNorm1d", "overrides_forward": False, "batches": 4, **options}
    return judge_layer("L", m, Thresholds(), **kwargs)


def test_every_situation_gets_its_own_fitting_hint() -> None:
    wrong = []
    for code, situation, values, options, has, lacks in SITUATIONS:
        found = [f for f in judged(values, options) if f.code == code]
        want = hint(code, situation, layer="L", upstream="stem.bn")
        if [f.hint for f in found] != [want]:
            wrong.append((code, situation, [f.hint for f in found]))
            continue
        missing = [w for w in has if w not in want] + [w for w in lacks if w in want]
        if missing:
            wrong.append((code, situation, missing))
    assert wrong == []
    impact = OutputImpact("train", 4, 4, 0.5, 1.0, None)
    (change,) = judge_model(impact, Thresholds(max_output_change=0.1))
    assert change.hint == HINTS["output-change"]


def test_every_situation_hint_is_tested_and_codes_are_complete() -> None:
    tested = {(code, situation) for code, situation, *_ in SITUATIONS}
    every = {(code, s) for code, hints in SITUATION_HINTS.items() for s in hints}
    # Situations the evidence decides after the rules (verdict.staleness, verdict.sites), with
    # their own tests in test_stale_evidence.py and test_evidence.py.
    every -= {("stale-stats", s) for s in ("stale", "worse", "no-gain", "shared")}
    # output-change is about the whole model, not-audited about a layer that was not measured:
    # neither comes from judge_layer.
    rest = {(code, "") for code in HINTS if code not in ("output-change", "not-audited")}
    rest.discard(("shared-bn", ""))  # judged per call site after the rules (verdict.sites)
    assert every | rest == tested
    assert set(CODES) == set(HINTS) | set(SITUATION_HINTS)
    assert not set(HINTS) & set(SITUATION_HINTS)
    for code, hints in SITUATION_HINTS.items():  # each situation says something of its own
        assert len(set(hints.values())) == len(hints), code


def test_every_known_explanation_has_a_specific_hint() -> None:
    """A mismatch explain.py can name gets a hint for that mistake, not the generic one."""
    keys = set()
    for uses_batch in (True, False):
        x = torch.randn(4, 3, 5, 3, dtype=torch.float64)  # last dim = C: channels-last too
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        case = explain.Case(
            x, 0.5 * x, mean, var, mean, var, mean, var, torch.ones(3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.float64), 1e-5, 60, uses_batch, torch.float32,
        )  # fmt: skip
        keys |= {key for key, *_ in explain.hypotheses(case)}
    activations = {k for k in keys if k.startswith("act:")}
    assert activations and keys - activations == set(EXPLAINED_AS)
    for key in keys - activations:
        mode = "train" if key in ("unbiased", "running-in-train") else "eval"
        (found,) = [f for f in judged(explained(mode, key), {}) if f.code == f"recon-{mode}"]
        assert found.hint == SITUATION_HINTS[f"recon-{mode}"][EXPLAINED_AS[key]], key


def test_init_and_warmup_messages_agree_with_their_severity() -> None:
    reset = [f for f in judged({"initial_stats": True}, {}) if f.code == "init-stats"]
    assert "never updated" not in reset[0].message and "400" in reset[0].message
    verified = judged(
        {"num_batches_tracked": 5, "init_weight": 0.59, "stale_fraction": 0.0, "stale_p": 1.0},
        {},
    )
    (warmup,) = [f for f in verified if f.code == "momentum-warmup"]
    assert warmup.severity == Severity.INFO and "fit the data" in warmup.message
