"""`bnaudit fold` as a library call: conv/linear → BN folded, checked against the model."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bnaudit.core.errors import BnauditError
from bnaudit.core.layers import find_bn_layers, preserved
from bnaudit.core.untrusted import clean
from bnaudit.gate.config import CheckSettings
from bnaudit.inputs.calls import call_model, move_batch, parse_input, to_call
from bnaudit.measure.dataflow import METHOD, Pairs
from bnaudit.measure.fold import check_folds, fold_model
from bnaudit.measure.impact import OutputDiff
from bnaudit.recalibrate.saving import atomic, check_output
from bnaudit.report.audit_report import AuditReport

if TYPE_CHECKING:
    pass

from bnaudit.check.run import prepare

# A folded model in float32 reproduces the original within float32 rounding of the sums.
FOLD_MAX_REL_L2 = 1e-5


@dataclass(frozen=True)
class Folded:
    pairs: Pairs
    rel_l2: float  # folded against the original, eval mode, on the sample batches
    max_abs: float
    output: Path


def run_fold(s: CheckSettings, output: Path, *, force: bool, log: Any = None) -> Folded:
    """Fold every conv/linear → BN pair seen on the first batch, check the folded model's
    output on every batch, then write it."""
    check_output(s.checkpoint, output, force=force)
    p = prepare(s, log)
    if isinstance(p, AuditReport):
        raise BnauditError(f"{s.checkpoint}: folding needs the architecture: pass --model")
    if not (s.data or s.input_shape):
        raise BnauditError("fold checks the folded model on batches: pass --data or --input-shape")
    device_dtype = _device_dtype(p.model)
    choice = parse_input(s.input)
    batches = [
        to_call(p.model, move_batch(b, *device_dtype), choice)
        for b in itertools.islice(p.batches, s.batches)
    ]
    if not batches:
        raise BnauditError(f"{s.data or s.input_shape}: no batch to fold and check on")
    pairs, _ = check_folds(p.model, batches[0])  # pairs are what the first batch shows
    if not pairs.pairs:
        raise BnauditError(
            f"{s.checkpoint}: no conv/linear -> BatchNorm pair to fold: {_skipped(pairs)}"
        )
    folded_model = fold_model(p.model, pairs)
    diff = OutputDiff()
    with preserved(p.model, find_bn_layers(p.model)), torch.no_grad():
        p.model.eval()
        for batch in batches:
            diff.add(call_model(p.model, batch), call_model(folded_model, batch))
    if not diff.rel_l2 <= FOLD_MAX_REL_L2:  # written so that NaN fails too
        raise BnauditError(
            f"{s.checkpoint}: the folded model's output differs from the original by "
            f"{diff.rel_l2:.3g} relative L2 (limit {FOLD_MAX_REL_L2:g}); nothing was written"
        )
    note = {
        "pairs": [[q.conv, q.bn] for q in pairs.pairs],
        "found_by": METHOD + (f" ({pairs.note})" if pairs.note else ""),
        "not_folded": dict(pairs.skipped),
        "source": clean(str(s.checkpoint)),
        "source_sha256": p.checkpoint.sha256,
        "check_rel_l2": diff.rel_l2,
        "note": "each conv/linear carries its BN (eval formula); the BN modules are "
        "nn.Identity in the folded model, so load this state dict into a model built that way",
    }
    state = {"state_dict": folded_model.state_dict(), "bnaudit_fold": note}
    atomic(output, lambda tmp: torch.save(state, tmp))
    return Folded(pairs, diff.rel_l2, diff.max_abs, output)


def _skipped(pairs: Pairs, shown: int = 5) -> str:
    text = "; ".join(f"{bn}: {why}" for bn, why in pairs.skipped[:shown])
    more = len(pairs.skipped) - shown
    text += f"; and {more} more BN layers" if more > 0 else ""
    return text or "the model has no BatchNorm layer"


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    t = next(model.parameters())
    return t.device, t.dtype
