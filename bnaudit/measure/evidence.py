"""Evidence for a recalibration: the task metric with stored against recalibrated statistics.

Stale statistics are stale relative to the audit batches; whether recalibrating to them helps
the task is a separate question that labels answer. The comparison is cross-fitted: the batches
are split in two halves (even and odd positions), statistics recalibrated on one half score the
other, and the reverse, so no batch is scored with statistics that saw it. A recalibration that
only looks good because it fitted the batches it is scored on is not reported as a gain.

The metric is computed per batch: top-1 accuracy for `[B, K]` class scores and integer labels,
or a user function `fn(outputs, labels) -> float` (higher is better). The difference is a
sample-size-weighted mean of per-batch paired differences; its standard error is that of the
weighted mean over batches (batches are the independent units: a batch's samples share its
statistics in train mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnaudit.inputs.calls import Call, call_model
from bnaudit.inputs.containers import tensors
from bnaudit.measure.impact import Evidence, precise_stats, statistics, stored_output
from bnaudit.measure.progress import ProgressFn, ticking

Metric = Callable[[Any, Tensor], float]
STAGE = "task metric"
# --- the output's own confidence, the evidence measured without labels
CONFIDENCE = "output confidence (minus mean entropy, nats)"
CONFIDENCE_STAGE = "output confidence"


def top1(outputs: Any, labels: Tensor) -> float:
    """Top-1 accuracy of one batch; NaN when the output is not one [B, K] score tensor."""
    scores = _scores(outputs, labels)
    if scores is None:
        return math.nan
    return float((scores.argmax(1) == labels.to(scores.device)).double().mean())


def confidence(outputs: Any, labels: Tensor | None = None) -> float:
    """Minus the mean entropy (nats) of the output read as scores (`score_dim`): higher is more
    confident. NaN when the output is not one floating tensor of at least two dims."""
    floats = [t for t in tensors(outputs) if t.is_floating_point()]
    if len(floats) != 1 or floats[0].dim() < 2 or not floats[0].numel():
        return math.nan
    scores = floats[0].detach().double()
    dim = score_dim(scores)
    if scores.shape[dim] == 1:  # one logit: a binary probability (a mask's, say)
        p = torch.sigmoid(scores)
        ent = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
    else:
        logp = scores.log_softmax(dim)
        ent = -(logp.exp() * logp).sum(dim)
    return -float(ent.mean())


def score_dim(scores: Tensor) -> int:
    """The dim a score tensor spreads its classes over: dim 1 of [B, K] and of NCHW/NCDHW
    maps, the last of [B, T, K] sequences."""
    return scores.dim() - 1 if scores.dim() == 3 else 1


def applies(outputs: Any, labels: Tensor | None) -> bool:
    """Whether top-1 accuracy can be measured on this output: [B, K] class scores (`_scores`)
    and integer labels of length B with values in [0, K)."""
    if labels is None or labels.dim() != 1 or labels.is_floating_point():
        return False  # per-frame or per-pixel labels, or targets of a regression
    scores = _scores(outputs, labels)
    if scores is None or not labels.numel():
        return False
    return bool(labels.min() >= 0 and labels.max() < scores.shape[1])


def _scores(outputs: Any, labels: Tensor) -> Tensor | None:
    """The class scores of an output: its one floating tensor, or its `logits` field or key
    (torchvision's GoogLeNet/Inception outputs, Hugging Face-style ones)."""
    if isinstance(outputs, dict):
        logits = outputs.get("logits")
    else:
        logits = getattr(outputs, "logits", None)
    floats = [t for t in tensors(outputs) if t.is_floating_point()]
    scores = logits if isinstance(logits, Tensor) else floats[0] if len(floats) == 1 else None
    if scores is None or scores.dim() != 2 or scores.shape[0] != labels.shape[0]:
        return None
    return scores


def measure(
    model: nn.Module,
    calls: Sequence[Call],
    layers: dict[str, nn.Module],
    names: Sequence[str],
    stored_outputs: list[Any] | None,
    *,
    regime: str,
    metric: Metric,
    metric_name: str,
    progress: ProgressFn | None = None,
    stage: str = STAGE,
) -> Evidence:
    """Score every batch with the stored statistics and with statistics recalibrated on the other
    half of the batches; `names` are the layers to recalibrate. `progress` is called after each
    batch of each of these passes (`bnaudit.measure.progress`), stages "task metric, ..."."""
    passes = 0
    stored: list[float] = []
    model.eval()
    for i, c in enumerate(ticking(list(calls), progress, _named(f"{stage}, stored stats"))):
        out, used = stored_output(model, c, i, stored_outputs)
        passes += used
        stored.append(metric(out, c.labels))
    recal: list[float] = [math.nan] * len(calls)
    halves = [list(range(0, len(calls), 2)), list(range(1, len(calls), 2))]
    for h, (fit, score) in enumerate((halves, halves[::-1]), 1):
        fitting = ticking([calls[i] for i in fit], progress, _fit_stage(h, regime, stage))
        stats, used = precise_stats(model, fitting, layers, names, regime)
        passes += used
        with statistics(layers, stats):
            model.eval()
            for i in ticking(score, progress, _named(f"{stage}, score half {3 - h}")):
                recal[i] = metric(call_model(model, calls[i]), calls[i].labels)
                passes += 1
    weights = [float(_rows(c)) for c in calls]
    diff, se = _paired(recal, stored, weights)
    total = sum(weights)
    return Evidence(
        metric=metric_name,
        regime=regime,
        batches=len(calls),
        samples=int(total),
        stored=sum(w * s for w, s in zip(weights, stored, strict=True)) / total,
        recalibrated=sum(w * r for w, r in zip(weights, recal, strict=True)) / total,
        difference=diff,
        stderr=se,
        forward_passes=passes,
    )


def _fit_stage(half: int, regime: str, stage: str = STAGE) -> Callable[[int], str]:
    """The name of the k-th pass recalibrating on `half`: one pass in the train regime, one
    per BN depth level in the eval regime (`bnaudit.measure.impact.eval_regime_stats`)."""
    if regime == "eval":
        return lambda k: f"{stage}, fit half {half}, pass {k}"
    return _named(f"{stage}, fit half {half}")


def _named(stage: str) -> Callable[[int], str]:
    """One name for every pass."""
    return lambda _: stage


def _rows(c: Call) -> int:
    x = c.labels if c.labels is not None else next(iter(tensors((c.args, c.kwargs))), None)
    return int(x.shape[0]) if isinstance(x, Tensor) and x.dim() else 1


def _paired(a: list[float], b: list[float], w: list[float]) -> tuple[float, float]:
    """Weighted mean of a − b over batches and its standard error (NaN with < 2 batches)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    total = sum(w)
    mean = sum(wi * di for wi, di in zip(w, d, strict=True)) / total
    k = len(d)
    if k < 2:
        return mean, math.nan
    # Cluster (batch) standard error of a ratio estimator, with the k/(k−1) small-sample factor.
    s = sum((wi * (di - mean)) ** 2 for wi, di in zip(w, d, strict=True))
    return mean, math.sqrt(s * k / (k - 1)) / total
