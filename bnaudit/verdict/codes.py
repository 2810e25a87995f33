"""Every finding code, check's and diff's, and the fix hint that follows each message."""

from __future__ import annotations

# Stable codes, in the README's order.
CODES: tuple[str, ...] = (
    "recon-train",
    "recon-eval",
    "running-update",
    "stale-stats",
    "train-eval-gap",
    "init-stats",
    "nonfinite",
    "bad-var",
    "tiny-var",
    "var-bias",
    "momentum-warmup",
    "momentum-convention",
    "no-running-stats",
    "nonstandard-forward",
    "not-reached",
    "fold-mismatch",
    "fold-risk",
    "output-change",
    "half-buffers",
    "no-counter",
    "bad-counter",
    "not-audited",
    "shared-bn",
)
# `bnaudit diff`'s codes (bnaudit.diff): judged from two checkpoints, not from one.
DIFF_CODES: tuple[str, ...] = (
    "stats-not-updated",
    "frozen-stats-updated",
    "counter-reset",
    "unmatched-layer",
)
# An artifact checked against its checkpoint (`bnaudit check ARTIFACT --against CKPT`), and the
# ONNX static audit's training-mode nodes.
ARTIFACT_CODES: tuple[str, ...] = (
    "training-mode",
    "eps-mismatch",
    "kept-stale",
    "folded-stale",
    "precision-loss",
    "missing",
    "artifact-output",
)
# The training watcher's codes (bnaudit.watch), also raised from a training checkpoint's
# counters by `check` (bnaudit.verdict.counters); `nonfinite` and `bad-counter` are check's own.
WATCH_CODES: tuple[str, ...] = (
    "double-update",
    "no-update",
    "frozen-stats-moving",
    "momentum-mismatch",
    "rank-drift",
)
ALL_CODES = CODES + DIFF_CODES + ARTIFACT_CODES + WATCH_CODES

# How to fix a finding. A code whose messages all call for the same fix has one hint here; a code
# whose messages describe different situations has one hint per situation (SITUATION_HINTS), so
# that a fix never contradicts the message it follows. `{layer}` and `{upstream}` are filled in.
HINTS: dict[str, str] = {
    "shared-bn": "judge the sites, not the module: do not recalibrate it (update_bn and bnaudit "
    "recalibrate average the sites into one pair that fits none); if the model should see each "
    "site normalised on its own, give each call its own BN module",
    "tiny-var": "near-zero running variance with large gamma amplifies noise and can overflow "
    "float16: check for dead channels, raise eps, or prune the channel",
    "var-bias": "expected with this few values per channel; validate in eval mode, or use larger "
    "batches or GroupNorm for this layer",
    "momentum-convention": "PyTorch momentum is the weight of the new batch (Keras 0.99 = PyTorch "
    "0.01): set momentum = 1 - keras_momentum and recalibrate",
    "no-running-stats": "eval output depends on the batch and fails on a single sample: set "
    "track_running_stats=True and calibrate, unless this is intended",
    "not-reached": "the module may be unused (defined in __init__, never called in forward): "
    "then nothing to fix, or delete it; if the model does use it, feed batches that reach it "
    "(another branch, task or input kind)",
    "fold-mismatch": "the folded conv does not reproduce conv -> BN in eval mode: do not deploy "
    "the folded model before finding out why (see the layer's recon-eval)",
    "output-change": "recalibrate the flagged layers (bnaudit recalibrate) and audit again; "
    "--attribution shows which layers matter",
    "half-buffers": "keep BatchNorm buffers in float32 (torch.autocast does, model.half() does "
    "not): convert the BN layers with .float() and recalibrate",
    "no-counter": "nothing to do for a FrozenBatchNorm; a BatchNorm loads it as T = 0, which "
    "restarts a cumulative average (momentum=None): recalibrate before training on",
    "bad-counter": "the counter was corrupted or written by hand; load_state_dict truncates it "
    "into the model's int64 buffer (NaN becomes garbage), which breaks momentum=None averaging: "
    "recalibrate (update_bn and bnaudit recalibrate set it to the batches averaged)",
    "not-audited": "a BatchNorm layer has 1-D floating running_mean and running_var of one length, "
    "and weight and bias of that length: find what rewrote these tensors (load_state_dict refuses "
    "them too); if the module is not BatchNorm, accept the finding with an ignore entry and a "
    "reason",
}
# The fixes for ARTIFACT_CODES, one hint each.
ARTIFACT_HINTS: dict[str, str] = {
    "training-mode": "the artifact normalises with the statistics of each batch: export the model "
    "after model.eval() (torch.onnx.export(..., training=TrainingMode.EVAL), the default; "
    "torch.export after .eval())",
    "eps-mismatch": "the artifact divides by sqrt(var + another eps) than the checkpoint's layer: "
    "export again from the model as it is, and look for an optimizer or converter that rewrites "
    "eps",
    "kept-stale": "the artifact's BatchNormalization holds other statistics than the checkpoint: "
    "it was exported from another checkpoint (or before a recalibration): export it again",
    "folded-stale": "the conv/linear was folded with other BN statistics than the checkpoint's: "
    "the artifact comes from another checkpoint (or one saved before a recalibration): export "
    "it again from this one",
    "precision-loss": "rounding the BN parameters to the artifact's dtype changes what the layer "
    "computes (a small running variance flushed to 0, say): keep BatchNorm (or the folded "
    "weights) in float32 when converting, or raise eps",
    "missing": "no node of the artifact holds this layer, unfolded or folded: check the export "
    "kept it; the end-to-end comparison still covers its effect",
    "artifact-output": "the artifact does not compute what the checkpoint's model computes in "
    "eval mode: see the layer findings for where it goes wrong, and export it again from this "
    "checkpoint in eval mode",
}
# The watcher's findings (bnaudit.watch) and the same codes judged from a training
# checkpoint's counters (bnaudit.verdict.counters), whose evidence is weaker: a count, not a step.
WATCH_HINTS: dict[str, str] = {
    "double-update": "each BN layer should update once per forward micro-batch: keep BN layers "
    "out of gradient-checkpointed segments, or undo the recomputation's update (fairscale's "
    "patch_batchnorm does); run a second forward (consistency loss, EMA teacher) with the BN "
    "layers in eval mode; if the extra forwards are meant (two views per step), declare them "
    "with accumulate=k",
    "no-update": "the layer ran in eval mode, or did not run, while the model trained: call "
    "model.train() before each training epoch (after validation); if BN is frozen on purpose, "
    "accept the finding",
    "frozen-stats-moving": "the layer's affine parameters are frozen, but it runs in train mode, "
    "so its running statistics keep moving: put the frozen part in eval mode after every "
    "model.train() (frozen.eval()), or unfreeze it",
    "momentum-mismatch": "the running statistics moved by another factor than the layer's "
    "momentum: look for a forward that passes its own momentum to F.batch_norm, or code that "
    "changes bn.momentum during the step",
    "rank-drift": "keep DDP's broadcast_buffers=True, convert the model with "
    "nn.SyncBatchNorm.convert_sync_batchnorm, or reduce the statistics across ranks before "
    "saving (bnaudit.distributed.compare_ranks, write_merged)",
    "nonfinite": "a batch reached the layer with NaN/Inf: its running statistics are now NaN "
    "for good; find the step's input or the layer upstream that overflowed (float16?), then "
    "recalibrate or restore the last finite checkpoint",
}
COUNTER_HINTS: dict[str, str] = {
    "double-update": "num_batches_tracked grows by one per train-mode forward: more counts than "
    "steps mean gradient checkpointing or a second forward per step updated the layer twice "
    "(watch a few steps with bnaudit.watch to see which), or gradient accumulation over "
    "micro-batches (then pass --accumulate K)",
    "no-update": "the layer was not updated while the model trained: it ran in eval mode "
    "(model.eval() left on, a frozen backbone) or was skipped by a branch; recalibrate it "
    "(bnaudit recalibrate) unless it was frozen on purpose",
    "bad-step": "the checkpoint's step count is not a count: it was corrupted or written by "
    "hand; the counters were not compared with it",
}
_PRUNE = "or clamp/prune the channels with huge gamma/sqrt(var + eps) before folding"
# A reconstruction mismatch that one known mistake explains (bnaudit.measure.explain keys): its fix.
_EXPLAINED = {
    "eps-outside": "eps is added to the standard deviation, not to the variance: normalise by "
    "sqrt(var + eps) in the layer's forward (or in the code that patches it)",
    "eps": "the forward uses another eps than the layer's eps attribute: make the two agree, or "
    "folding and export compute something else than the model",
    "no-affine": "gamma and beta are not applied: the forward drops the affine step although the "
    "layer has weight and bias; apply them, or build the layer with affine=False",
    "per-sample": "the statistics are per sample (an instance norm), not over the batch: the "
    "layer's forward is not BatchNorm's; check its class and any code patching it",
    "batch-dim-only": "the statistics are over the batch dim only, not over the spatial dims "
    "too: the forward reduces over the wrong dims",
    "channels-last": "the statistics are over the last dim: the input reaches the layer "
    "channels-last (NHWC); permute it to NCHW before this layer",
    "half-rounding": "the output is BN computed in half precision: look for autocast or a "
    "float16/bfloat16 cast in or around this layer; keep BatchNorm in float32",
    "activation": "the output is BN followed by an activation, yet the class does not override "
    "forward: a patched forward or a forward hook applies it; audit the plain layer",
    "explained": "the message names what the layer computes instead: fix that in its forward, or "
    "in the code that patches it",
    "unexplained": "none of the known mistakes explains it: compare the layer's forward with the "
    "formula `bnaudit show CHECKPOINT --layer {layer}` prints, and look for a patched forward",
}
SITUATION_HINTS: dict[str, dict[str, str]] = {
    "recon-train": {
        "undiagnosed": "the train-mode output is not BN with batch statistics: look for a "
        "patched or overridden forward",
        "unbiased": "the forward normalises with the unbiased batch variance (divide by N-1); "
        "train mode uses the biased one (divide by N): use var(unbiased=False) or F.batch_norm",
        "running-in-train": "train mode normalises with the running stats: the forward takes the "
        "eval path while training (e.g. F.batch_norm with training=False); use batch statistics",
        **_EXPLAINED,
    },
    "recon-eval": {
        "undiagnosed": "the eval-mode output is not BN with the stored running statistics: look "
        "for a patched or overridden forward",
        "batch-in-eval": "eval mode normalises with batch statistics: the forward ignores the "
        "running stats (e.g. F.batch_norm with training=True); use them in eval mode",
        **_EXPLAINED,
    },
    "running-update": {
        "stats": "a train step does not update the running stats as (1-m)*old + m*batch "
        "(unbiased variance): look for custom momentum or update code",
        "counter": "num_batches_tracked does not grow by exactly 1 per train-mode forward: look "
        "for custom update code; with momentum=None the average's weights depend on it",
    },
    "stale-stats": {
        "stale": "the evidence in the message says the stats are stale: recalibrate on data "
        "like the served data (torch.optim.swa_utils.update_bn(loader, model), or bnaudit "
        "recalibrate) and save the checkpoint again",
        "worse": "the weights fit the stored statistics better than these batches' own: do not "
        "recalibrate to these batches; audit with batches drawn like the training data",
        "no-gain": "{metric} does not show the stats hurt: do not recalibrate for this finding; "
        "audit with more labelled batches to narrow the interval",
        "unproven": "do not recalibrate on this finding alone: if the model was trained with "
        "frozen statistics, recalibrating breaks it. Labelled batches (or --metric) decide: "
        "bnaudit check measures whether recalibrating helps the task metric",
        "shared": "do not update_bn this module (it averages the call sites): give each call "
        "its own BN module and recalibrate those, or retrain with the module shared",
    },
    "train-eval-gap": {
        "gap": "stats fit train mode but not what the deployed (eval) model sees; recalibrate "
        "in eval mode layer by layer, or normalise over larger batches",
        "downstream": "recalibrate {upstream} first, then audit again",
    },
    "init-stats": {
        "never-updated": "the layer never ran in train mode on data: calibrate it "
        "(torch.optim.swa_utils.update_bn) before saving",
        "reset": "the stats were reset or overwritten after training while the counter was "
        "kept (a re-created layer, a partial state-dict load): recalibrate before saving",
        "frozen": "a frozen layer holding the initial values: the checkpoint's statistics were "
        "not loaded into it (check the state-dict keys), or its source was never calibrated",
        "no-count": "the stats themselves may be fine; a cumulative average (momentum=None) "
        "restarts at T = 0 and the next train batch overwrites them: set num_batches_tracked "
        "or recalibrate before training on",
    },
    "nonfinite": {
        "values": "restore an earlier checkpoint or recalibrate; look for overflow in training",
        "outputs": "weights and stats are finite, yet the layer turns finite inputs into NaN/Inf: "
        "see its other findings (running_var <= 0, huge gamma/sqrt(var + eps)) and look for "
        "float16 overflow",
    },
    "bad-var": {
        "negative": "a running variance is never negative after a real update: the buffer was "
        "corrupted or written by hand; recalibrate",
        "zero": "an exactly zero running variance comes from a channel whose input was constant "
        "in training (dead or pruned) or from a buffer written by hand: prune the channel, or "
        "recalibrate",
    },
    "momentum-warmup": {
        "unverified": "if the stats are this EMA, the initial 0/1 values still weigh in them: "
        "calibrate with more batches; a cumulative average over T batches (update_bn) carries "
        "none: an audit with data tells which",
        "undecided": "if the stats are this EMA, the initial 0/1 values still weigh in them: "
        "calibrate with more batches; a cumulative average over T batches (update_bn) carries "
        "none: batches the stale check can judge here (the message says what was missing) "
        "tell which",
        "stale": "the stats do not fit the data and still carry their initial 0/1 values: "
        "calibrate with more batches",
        "verified": "nothing to fix: the stats fit the data, as a cumulative average over T "
        "batches (update_bn) leaves them; training on starts its EMA from them",
    },
    "nonstandard-forward": {
        "mismatch": "the override does not compute BN: its recon/running-update findings say "
        "what it does instead; fix the forward, or accept it with an ignore entry",
        "variant": "nothing to fix if intended: the normalisation is exact and the formula "
        "checks allowed for what the override adds",
        "inside": "nothing to fix if intended: the normalisation is exact where it happens, the "
        "input of the layer's dropout or activation; what those add is not BN",
        "plain": "nothing to fix: the override computes plain BN on these batches, and the "
        "formula checks test what it computes",
        "unchecked": "the layer did not run on the sample batches, so what the override "
        "computes is unchecked: feed data that reaches it",
    },
    "fold-risk": {
        "float16": "keep the folded model in float32 (or bfloat16), " + _PRUNE,
        "int8": "quantize the folded weights per channel, not per tensor, " + _PRUNE,
    },
}


# The fixes for DIFF_CODES, with the same conventions: one hint, or one per situation.
DIFF_HINTS: dict[str, str] = {
    "frozen-stats-updated": "keep frozen BN in eval mode: call .eval() on the frozen part after "
    "every model.train() (or use FrozenBatchNorm2d); nothing to fix if it was not meant frozen",
    "unmatched-layer": "the checkpoints hold different layers here, which were not compared: "
    "compare checkpoints of one architecture, or accept it if the architecture changed on "
    "purpose",
}
DIFF_SITUATION_HINTS: dict[str, dict[str, str]] = {
    "stats-not-updated": {
        "stale": "recalibrate on training-like data (bnaudit recalibrate, or "
        "torch.optim.swa_utils.update_bn(loader, model)), or fine-tune with BN in train mode; "
        "if BN was kept in eval mode on purpose, the weights were trained with these statistics: "
        "compare the task metric before and after recalibrating (bnaudit check with labelled "
        "--data) before you do",
        "frozen": "nothing to fix if the layer is a FrozenBatchNorm on purpose (detectron2, "
        "torchvision detection): the weights were fine-tuned with these statistics",
    },
    "counter-reset": {
        "recalibrated": "nothing to fix if this is a recalibration: update_bn and bnaudit "
        "recalibrate set num_batches_tracked to the number of batches averaged",
        "reset": "the counter restarted (a re-created model, a partial state-dict load): with "
        "momentum=None the next train batch weighs 1/T, so restore the counter or recalibrate",
    },
}


def diff_hint(code: str, situation: str = "") -> str:
    """The fix for a DIFF_CODES finding in `situation` ("": a code with one hint)."""
    return DIFF_SITUATION_HINTS[code][situation] if situation else DIFF_HINTS[code]


def hint(code: str, situation: str = "", **fields: str) -> str:
    """The fix for `code` in `situation` ("": a code with one hint), its fields filled in."""
    text = SITUATION_HINTS[code][situation] if situation else HINTS[code]
    return text.format(**fields) if fields else text


def artifact_hint(code: str) -> str:
    """The fix for an ARTIFACT_CODES finding."""
    return ARTIFACT_HINTS[code]
