"""Each layer rule alone, called directly (not through `judge_layer`'s table): on minimal
metrics it fires with its code, severity, situation hint and numbers, and on a near miss it
stays silent."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest

from bnaudit.core.keys import ACTIVATION_KEY
from bnaudit.verdict.codes import CODES, HINTS, SITUATION_HINTS, hint
from bnaudit.verdict.findings import judge_layer, judge_model, not_audited
from bnaudit.verdict.results import Finding, Severity
from bnaudit.verdict.rules import RULES, LayerContext, Rule
from bnaudit.verdict.rules.data import stale_stats, train_eval_gap, var_bias
from bnaudit.verdict.rules.fold import FLOAT16_MAX, fold_mismatch, fold_risk
from bnaudit.verdict.rules.formula import (
    nonstandard_forward,
    not_reached,
    recon_eval,
    recon_train,
    running_update,
)
from bnaudit.verdict.rules.stored import (
    bad_counter,
    bad_var,
    half_buffers,
    init_stats,
    momentum_convention,
    momentum_warmup,
    no_counter,
    no_running_stats,
    nonfinite,
    tiny_var,
)
from bnaudit.verdict.thresholds import Thresholds
from tests.reports import metrics

# Every figure measured and healthy: no rule fires on it.
HEALTHY: dict[str, Any] = {
    "max_amplification": 3.0,
    "recon_train_max_err": 1e-7,
    "recon_train_ratio": 0.01,
    "recon_eval_max_err": 1e-7,
    "recon_eval_ratio": 0.01,
    "update_mean_ratio": 0.01,
    "update_var_ratio": 0.01,
    "stale_fraction": 0.0,
    "stale_p": 1.0,
    "gap_fraction": 0.0,
    "gap_p": 1.0,
    "eval_scale": 0.999,
    "init_weight": 1e-9,
    "fold_ratio": 0.01,
    "folded_weight_max": 10.0,
    "fold_int8_levels": 60.0,
}
STALE = {"stale_fraction": 0.5, "stale_p": 1e-9, "stale_shift_max": 2.0, "stale_channel": 3}
GAP = {"gap_fraction": 0.5, "gap_p": 1e-9, "gap_shift_max": 1.5}


def context(**options: Any) -> LayerContext:
    """The healthy layer `bn`, with `options` split into metrics and what the passes saw."""
    passes = ("type_name", "overrides_forward", "batches", "upstream_stale", "runs_first")
    around = {k: options.pop(k) for k in passes if k in options}
    around.setdefault("type_name", "BatchNorm2d")
    around.setdefault("batches", 4)
    return LayerContext("bn", metrics(**(HEALTHY | options)), Thresholds(), **around)


def one(rule: Rule, **options: Any) -> Finding:
    """The one finding `rule` gives on the healthy layer changed by `options`."""
    found = list(rule(context(**options)))
    assert len(found) == 1, found
    return found[0]


def silent(rule: Rule, **options: Any) -> bool:
    return list(rule(context(**options))) == []


def test_the_table_has_one_rule_per_layer_code_in_the_readme_codes() -> None:
    assert set(RULES) <= set(CODES)
    # model / group codes, and shared-bn, judged per call site after the rules (verdict.sites)
    assert set(CODES) - set(RULES) == {"output-change", "not-audited", "shared-bn"}
    assert len(set(RULES.values())) == len(RULES)
    healthy = metrics(**HEALTHY)
    assert (
        judge_layer("bn", healthy, Thresholds(), type_name="BN", overrides_forward=False, batches=4)
        == ()
    )


@pytest.mark.parametrize("code", list(RULES))
def test_no_rule_fires_on_a_healthy_layer(code: str) -> None:
    assert silent(RULES[code])


def test_nonfinite_values_then_outputs() -> None:
    f = one(nonfinite, nonfinite_values=3, nonfinite_outputs=5)
    assert (f.code, f.severity, f.value, f.threshold) == ("nonfinite", Severity.FAIL, 3, 0)
    assert f.message == "3 NaN/Inf value(s) in weight, bias or running stats"
    assert f.hint == hint("nonfinite", "values")
    f = one(nonfinite, nonfinite_outputs=5)
    assert f.message.startswith("5 non-finite output") and f.hint == hint("nonfinite", "outputs")
    assert silent(nonfinite, nonfinite_inputs=7)  # the input's, not the layer's


def test_bad_var_negative_fails_and_zero_warns() -> None:
    negative, zero = bad_var(context(negative_var_channels=2, zero_var_channels=1))
    assert (negative.severity, negative.value, negative.hint) == (
        Severity.FAIL,
        2,
        hint("bad-var", "negative"),
    )
    assert (zero.severity, zero.hint) == (Severity.WARN, hint("bad-var", "zero"))
    assert "sqrt(eps)" in zero.message
    assert silent(bad_var, negative_var_channels=0, zero_var_channels=0)


def test_tiny_var_above_the_limit_only_and_finite() -> None:
    f = one(tiny_var, max_amplification=1001.0)
    assert (f.severity, f.value, f.threshold) == (Severity.WARN, 1001.0, 1000.0)
    assert f.message == "max |gamma|/sqrt(running_var + eps) = 1e+03 > 1e+03"
    assert silent(tiny_var, max_amplification=1000.0)
    assert silent(tiny_var, max_amplification=math.inf)  # nonfinite's, not this rule's
    assert silent(tiny_var, max_amplification=math.nan)


@pytest.mark.parametrize(("dtype", "step"), [("float16", "0.0005"), ("bfloat16", "0.004")])
def test_half_buffers_in_float16_and_bfloat16(dtype: str, step: str) -> None:
    f = one(half_buffers, buffer_dtype=dtype)
    assert f.severity == Severity.WARN and f.hint == HINTS["half-buffers"]
    assert f"stored in {dtype}: relative precision {step}," in f.message
    assert ("overflow to inf" in f.message) == (dtype == "float16")
    assert silent(half_buffers, buffer_dtype="float32")


def test_bad_counter_names_the_problem() -> None:
    f = one(bad_counter, counter_problem="negative (-3)")
    assert f.message == "num_batches_tracked is not a count of batches: negative (-3)"
    assert silent(bad_counter, counter_problem="")


def test_no_counter_unless_bad_instance_or_untracked() -> None:
    f = one(no_counter, num_batches_tracked=None)
    assert (f.code, f.severity) == ("no-counter", Severity.INFO)
    assert silent(no_counter, num_batches_tracked=None, counter_problem="NaN")
    assert silent(no_counter, num_batches_tracked=None, kind="instance")
    assert silent(no_counter, num_batches_tracked=None, track_running_stats=False)
    assert silent(no_counter, num_batches_tracked=0)


def test_no_running_stats() -> None:
    f = one(no_running_stats, track_running_stats=False)
    assert (f.severity, f.hint) == (Severity.WARN, HINTS["no-running-stats"])
    assert silent(no_running_stats)


@pytest.mark.parametrize(
    ("changes", "severity", "situation"),
    [
        ({"num_batches_tracked": 0}, Severity.INFO, "no-count"),
        (
            {"initial_stats": True, "kind": "frozen", "num_batches_tracked": None},
            Severity.FAIL,
            "frozen",
        ),
        ({"initial_stats": True, "num_batches_tracked": 400}, Severity.FAIL, "reset"),
        ({"initial_stats": True, "num_batches_tracked": 0}, Severity.FAIL, "never-updated"),
    ],
)
def test_init_stats_situations(changes: dict[str, Any], severity: Severity, situation: str) -> None:
    f = one(init_stats, **changes)
    assert (f.code, f.severity, f.hint) == ("init-stats", severity, hint("init-stats", situation))
    assert silent(init_stats, **changes, track_running_stats=False)


def test_init_stats_silent_on_updated_stats() -> None:
    assert silent(init_stats, num_batches_tracked=400, initial_stats=False)


def test_momentum_warmup_weighs_the_data() -> None:
    warmup = {"num_batches_tracked": 3, "init_weight": 0.729}
    f = one(momentum_warmup, **warmup, stale_judged="no: static audit", batches=0)
    assert (f.severity, f.hint) == (Severity.WARN, hint("momentum-warmup", "unverified"))
    assert f.message == (
        "after T = 3 updates an EMA would still carry (1-m)^T = 0.729 of the initial values "
        "(limit 0.05)"
    )
    # Batches that could not tell: the message says why, the hint does not promise "data".
    f = one(momentum_warmup, **warmup, stale_judged="no: batch size 2 < 3")
    assert (f.severity, f.hint) == (Severity.WARN, hint("momentum-warmup", "undecided"))
    assert f.message.endswith("; these batches cannot tell: batch size 2 < 3")
    assert "an audit with data" not in f.hint
    f = one(momentum_warmup, **warmup, **STALE)
    assert (f.severity, f.hint) == (Severity.WARN, hint("momentum-warmup", "stale"))
    f = one(momentum_warmup, **warmup)
    assert (f.severity, f.hint) == (Severity.INFO, hint("momentum-warmup", "verified"))
    assert silent(momentum_warmup, num_batches_tracked=3, init_weight=0.05)  # at the limit
    assert silent(momentum_warmup, **warmup, initial_stats=True)  # init-stats says it
    assert silent(momentum_warmup, **warmup, momentum=math.nan)  # unknown momentum
    assert silent(momentum_warmup, num_batches_tracked=0, init_weight=1.0)


def test_momentum_convention_at_and_above_the_keras_limit() -> None:
    f = one(momentum_convention, momentum=0.5)
    assert (f.severity, f.value, f.threshold) == (Severity.WARN, 0.5, 0.5)
    assert f.message.startswith("momentum = 0.5 >= 0.5: likely a Keras/TF value")
    assert silent(momentum_convention, momentum=0.49)
    assert silent(momentum_convention, momentum=None)


def test_not_reached_only_when_batches_ran() -> None:
    f = one(not_reached, calls=0)
    assert (f.severity, f.hint) == (Severity.INFO, HINTS["not-reached"])
    assert silent(not_reached, calls=0, batches=0)
    assert silent(not_reached, calls=1)
    assert "may be unused" in f.hint


def test_an_unreached_layer_fails_no_check_that_needs_it_to_run() -> None:
    never = {"initial_stats": True, "num_batches_tracked": 0, "calls": 0}
    assert silent(init_stats, **never)  # the initial values of a module that never runs
    f = one(not_reached, **never)
    assert "initial values" in f.message and f.severity == Severity.INFO
    assert one(init_stats, **never, batches=0).severity == Severity.FAIL  # static: no forward
    assert one(init_stats, **{**never, "calls": 3}).severity == Severity.FAIL  # ran, not updated


@pytest.mark.parametrize(("rule", "mode"), [(recon_train, "train"), (recon_eval, "eval")])
def test_recon_over_the_tolerance(rule: Rule, mode: str) -> None:
    f = one(rule, **{f"recon_{mode}_ratio": 2.5, f"recon_{mode}_max_err": 1e-3})
    assert (f.code, f.severity, f.value, f.threshold) == (f"recon-{mode}", Severity.FAIL, 2.5, 1.0)
    assert f.message == (
        f"{mode}-mode output differs from the BN formula: max abs err 0.001, 2.5x the tolerance "
        "(limit 1x)"
    )
    assert f.hint == SITUATION_HINTS[f"recon-{mode}"]["undiagnosed"]
    assert silent(rule, **{f"recon_{mode}_ratio": 1.0})
    assert silent(rule, **{f"recon_{mode}_ratio": math.nan}, calls=0)
    assert one(rule, **{f"recon_{mode}_ratio": math.nan}).value != 0  # NaN is not a pass


def test_recon_explained_and_unexplained() -> None:
    why = {"recon_eval_explanation": "eps outside the sqrt", "recon_eval_explanation_err": 1e-8}
    why |= {"recon_eval_ratio": 9.0, "recon_eval_explanation_key": "eps-outside"}
    fits = one(recon_eval, **why, recon_eval_explanation_ratio=0.5)
    assert fits.message.endswith("; it matches eps outside the sqrt (err 1e-08) instead")
    assert fits.hint == hint("recon-eval", "eps-outside")
    far = one(recon_eval, **why, recon_eval_explanation_ratio=4.0)
    assert "no known mistake explains it (closest: eps outside the sqrt" in far.message
    assert far.hint == hint("recon-eval", "unexplained", layer="bn")


def test_running_update_stats_and_counter() -> None:
    stats, counter = running_update(
        context(update_mean_ratio=3.0, update_var_ratio=math.nan, update_count_errors=2)
    )
    assert stats.value is not None and math.isnan(stats.value)  # NaN var ratio: not a pass
    assert stats.message.endswith("(1-m)*old + m*batch: 3x (mean), nanx (var) the tolerance")
    assert stats.hint == hint("running-update", "stats")
    assert counter.message == "num_batches_tracked did not grow by 1 in 2 train step(s)"
    assert counter.hint == hint("running-update", "counter")
    assert silent(running_update, update_mean_ratio=3.0, kind="frozen")
    assert silent(running_update, update_mean_ratio=3.0, track_running_stats=False)
    assert silent(running_update, update_mean_ratio=1.0, update_var_ratio=1.0)


def test_nonstandard_forward_says_what_the_override_computes() -> None:
    plain = one(nonstandard_forward, overrides_forward=True, type_name="MyBN")
    assert (plain.severity, plain.message) == (
        Severity.INFO,
        "MyBN overrides forward and still computes plain BN",
    )
    assert plain.hint == hint("nonstandard-forward", "plain")
    wrong = one(nonstandard_forward, overrides_forward=True, recon_train_ratio=5.0)
    assert (wrong.severity, wrong.hint) == (Severity.WARN, hint("nonstandard-forward", "mismatch"))
    inside = one(nonstandard_forward, overrides_forward=True, measured_at="input of its ReLU")
    assert inside.hint == hint("nonstandard-forward", "inside")
    unrun = one(nonstandard_forward, overrides_forward=True, calls=0)
    assert unrun.message.endswith("overrides forward (not run, so not checked)")
    assert silent(nonstandard_forward, overrides_forward=False, recon_train_ratio=5.0)


def test_an_override_adding_an_activation_is_a_variant_not_a_mismatch() -> None:
    variant = {
        "overrides_forward": True,
        "recon_eval_ratio": 50.0,
        "recon_eval_explanation": "BN then ReLU",
        "recon_eval_explanation_err": 1e-8,
        "recon_eval_explanation_ratio": 0.1,
        "recon_eval_explanation_key": ACTIVATION_KEY + "relu",
    }
    assert silent(recon_eval, **variant)
    f = one(nonstandard_forward, **variant)
    assert (f.severity, f.hint) == (Severity.INFO, hint("nonstandard-forward", "variant"))
    assert f.message.endswith(
        "and its output is BN then ReLU (err 1e-08); the normalisation itself is exact"
    )
    without = one(recon_eval, **(variant | {"overrides_forward": False}))
    assert without.hint == hint("recon-eval", "activation")


def test_stale_stats_by_the_count_rule() -> None:
    f = one(stale_stats, **STALE)
    # WARN until evidence says stale rather than the data different (verdict.staleness)
    assert (f.severity, f.value, f.threshold) == (Severity.WARN, 0.5, 0.1)
    assert f.message.startswith(
        "running stats do not describe the train-mode input, relative to these batches: "
        "4 of 8 channels (50%) beyond the limits and sample noise, p = 1e-09 from noise alone "
        "(limits 10%, 2 channels, p < 0.001): mean shift up to 2 sd (limit 0.3)"
    )
    assert f.message.endswith("worst channel 3") and f.hint == hint("stale-stats", "unproven")
    first = one(stale_stats, **STALE, runs_first=True)
    assert first.message.endswith("; no BN layer that fits these batches runs before it")
    assert first.hint == hint("stale-stats", "unproven")
    assert silent(stale_stats, **(STALE | {"stale_p": 0.01}))  # noise could do it
    assert silent(stale_stats, **(STALE | {"stale_fraction": 0.125}))  # 1 channel of 8
    assert silent(stale_stats, **STALE, stale_judged="no: synthetic data")


def test_train_eval_gap_alone_or_downstream_of_stale_layers() -> None:
    f = one(train_eval_gap, **GAP)
    assert (f.severity, f.hint) == (Severity.WARN, hint("train-eval-gap", "gap"))
    assert f.message.endswith("mean shift 1.5 sd, ln var ratio nan; the stats fit train mode")
    upstream = tuple(f"l{i}.bn" for i in range(5))
    down = one(train_eval_gap, **GAP, upstream_stale=upstream)
    assert down.severity == Severity.INFO
    assert down.message.endswith("earlier in the forward pass (l0.bn, l1.bn, l2.bn and 2 more)")
    assert down.hint == "recalibrate l0.bn, l1.bn, l2.bn and 2 more first, then audit again"
    assert silent(train_eval_gap, **GAP, **STALE)  # stale-stats says it
    assert silent(train_eval_gap, **(GAP | {"gap_p": 0.5}))
    assert silent(train_eval_gap, **GAP, gap_judged="n/a: regime eval")


def test_var_bias_on_few_values_per_channel() -> None:
    f = one(var_bias, eval_scale=0.9, values_per_channel=3, bessel_factor=1.5)
    assert (f.severity, f.threshold) == (Severity.WARN, 0.02)
    assert f.value == pytest.approx(0.1)
    assert f.message.startswith("N = 3 values per channel: running_var estimates the unbiased")
    assert f.message.endswith("scaled by 0.9 relative to train mode (limit 0.98)")
    assert silent(var_bias, eval_scale=0.99)
    assert silent(var_bias, eval_scale=0.9, kind="frozen")
    assert silent(var_bias, eval_scale=0.9, calls=0)


def test_fold_mismatch_when_the_fold_was_checked() -> None:
    fold = {"fold_with": "conv1", "fold_checked": True, "fold_ratio": 4.0, "fold_max_err": 0.01}
    f = one(fold_mismatch, **fold)
    assert (f.severity, f.value, f.hint) == (Severity.FAIL, 4.0, HINTS["fold-mismatch"])
    assert f.message.startswith("folded into conv1, the output differs from conv1 -> BN")
    assert silent(fold_mismatch, **(fold | {"fold_checked": False}))
    assert silent(fold_mismatch, **(fold | {"fold_ratio": 1.0}))
    assert silent(fold_mismatch, **(fold | {"fold_with": ""}))


def test_fold_risk_float16_before_int8() -> None:
    f = one(fold_risk, fold_with="conv1", folded_weight_max=1e5, fold_int8_levels=2.0)
    assert (f.value, f.threshold, f.hint) == (1e5, FLOAT16_MAX, hint("fold-risk", "float16"))
    f = one(fold_risk, fold_with="conv1", fold_int8_levels=2.0)
    assert (f.value, f.threshold, f.hint) == (2.0, 8.0, hint("fold-risk", "int8"))
    assert "keeps 2 of 127 int8 per-tensor levels (limit 8)" in f.message
    assert silent(fold_risk, fold_with="conv1", fold_int8_levels=8.0, folded_weight_max=65504.0)
    assert silent(fold_risk, folded_weight_max=1e5, fold_int8_levels=2.0)  # nothing to fold into


def test_output_change_gate_and_not_audited() -> None:
    impact = SimpleNamespace(rel_l2=0.2, max_abs=1.5, top1_agreement=0.9, regime="train")
    t = Thresholds(max_output_change=0.1)
    (f,) = judge_model(impact, t)
    assert (f.code, f.severity, f.value, f.threshold) == ("output-change", Severity.FAIL, 0.2, 0.1)
    assert f.message.endswith("max abs 1.5, top-1 agreement 90%")
    assert judge_model(impact, Thresholds(max_output_change=0.2)) == ()
    assert judge_model(impact, Thresholds()) == ()  # the gate is off by default
    g = not_audited("head", "2-D running_mean")
    assert (g.code, g.severity, g.hint) == ("not-audited", Severity.FAIL, HINTS["not-audited"])
    assert "(2-D running_mean)" in g.message
