"""The layer rules, one per finding code, in the order their findings are listed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bnaudit.verdict.results import Finding
from bnaudit.verdict.rules.context import LayerContext
from bnaudit.verdict.rules.data import stale_stats, train_eval_gap, var_bias
from bnaudit.verdict.rules.fold import fold_mismatch, fold_risk
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

Rule = Callable[[LayerContext], Iterator[Finding]]

# Static checks first, then the formula, the data, folding and momentum; `judge_layer` sorts
# by severity with a stable sort, so this order breaks ties in the report.
RULES: dict[str, Rule] = {
    "nonfinite": nonfinite,
    "bad-var": bad_var,
    "tiny-var": tiny_var,
    "half-buffers": half_buffers,
    "bad-counter": bad_counter,
    "no-counter": no_counter,
    "no-running-stats": no_running_stats,
    "init-stats": init_stats,
    "momentum-warmup": momentum_warmup,
    "not-reached": not_reached,
    "recon-train": recon_train,
    "recon-eval": recon_eval,
    "running-update": running_update,
    "nonstandard-forward": nonstandard_forward,
    "stale-stats": stale_stats,
    "train-eval-gap": train_eval_gap,
    "var-bias": var_bias,
    "fold-mismatch": fold_mismatch,
    "fold-risk": fold_risk,
    "momentum-convention": momentum_convention,
}
