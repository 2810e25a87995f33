"""`bnaudit show`: one layer explained — its attributes, its exact formulas, runnable code.

It answers "which attributes of `bn` do I use to reproduce its output by hand, in train and in
eval mode?" for the layer's own kind (BatchNorm, InstanceNorm with running stats, frozen BN).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import nn

from bnaudit.core import formulas as F
from bnaudit.core.errors import BnauditError
from bnaudit.core.layers import LayerAttrs, LayerKind, find_bn_layers
from bnaudit.verdict.results import LayerResult

CHANNELS_SHOWN = 4  # the first channels, then as many of the most amplifying ones


@dataclass(frozen=True)
class LayerView:
    name: str
    attrs: LayerAttrs
    input_dims: str  # e.g. "[B, C, H, W]"
    channels: tuple[int, ...]  # which channels the table shows
    result: LayerResult | None = None  # measured, when the command had data


_DIMS = {
    "BatchNorm1d": "[B, C] or [B, C, L]",
    "BatchNorm2d": "[B, C, H, W]",
    "BatchNorm3d": "[B, C, D, H, W]",
    "InstanceNorm1d": "[B, C, L]",
    "InstanceNorm2d": "[B, C, H, W]",
    "InstanceNorm3d": "[B, C, D, H, W]",
}


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The BN-like layer called `name`, or an error listing the close names."""
    layers = dict(find_bn_layers(model))
    if name in layers:
        return layers[name]
    close = difflib.get_close_matches(name, list(layers), n=5, cutoff=0.4)
    listing = ", ".join(close or list(layers)[:8])
    raise BnauditError(f"--layer {name}: no BatchNorm layer of that name; try {listing}")


def describe(model: nn.Module, name: str, result: LayerResult | None = None) -> LayerView:
    module = find_layer(model, name)
    attrs = LayerAttrs.of(module)
    dims = _DIMS.get(type(module).__name__, "[B, C, ...]")
    if attrs.running_var is not None:
        amp = F.amplification(attrs.weight, attrs.running_var, attrs.eps)
        ranked = [int(i) for i in torch.argsort(amp, descending=True)]
    else:
        ranked = []
    first = list(range(min(CHANNELS_SHOWN, attrs.num_features)))
    extra = [c for c in ranked if c not in first][:CHANNELS_SHOWN]
    return LayerView(name, attrs, dims, tuple(first + sorted(extra)), result)


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.6g}"


def _channel_table(v: LayerView) -> str:
    a = v.attrs

    def at(t: torch.Tensor | None, c: int) -> str:
        return "-" if t is None else _fmt(float(t[c]))

    amp = F.amplification(a.weight, a.running_var, a.eps) if a.running_var is not None else None
    rows = [
        [c, at(a.weight, c), at(a.bias, c), at(a.running_mean, c), at(a.running_var, c), at(amp, c)]
        for c in v.channels
    ]
    headers = [
        "channel",
        "weight (γ)",
        "bias (β)",
        "running_mean (μ_r)",
        "running_var (σ²_r)",
        "|γ|/sqrt(σ²_r+ε)",
    ]
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def formulas_text(v: LayerView) -> list[str]:
    """The train- and eval-mode formulas written with the layer's attribute names."""
    a = v.attrs
    gamma = "bn.weight · " if a.weight is not None else ""
    beta = " + bn.bias" if a.bias is not None else ""
    lines = []
    if a.kind is LayerKind.FROZEN:
        lines += [
            "Every mode (a frozen BN never uses batch statistics and is never updated):",
            f"  y = {gamma}(x − bn.running_mean) / sqrt(bn.running_var + bn.eps){beta}",
        ]
        return lines
    if a.kind is LayerKind.INSTANCE:
        lines += [
            "Train mode (bn.training is True): per-sample statistics over the spatial dims",
            "  mean_s = x.mean(dims, keepdim=True),  var_s = x.var(dims, unbiased=False, "
            "keepdim=True),  dims = (2, ...)",
            f"  y = {gamma}(x − mean_s) / sqrt(var_s + bn.eps){beta}",
        ]
    else:
        lines += [
            "Train mode (bn.training is True): batch statistics, BIASED variance",
            "  mean_b = x.mean(dims),  var_b = x.var(dims, unbiased=False),  dims = every dim "
            "but 1",
            f"  y = {gamma}(x − mean_b) / sqrt(var_b + bn.eps){beta}",
        ]
    if a.has_running_stats:
        if a.kind is LayerKind.INSTANCE:
            factor = "bn.momentum" if a.momentum is not None else "0 (momentum None: no update)"
            upd_mean, upd_var = "mean_s averaged over the batch", "var_s·N/(N−1) averaged"
        else:
            factor = (
                "bn.momentum"
                if a.momentum is not None
                else "1/(bn.num_batches_tracked + 1) (momentum None: cumulative average)"
            )
            upd_mean, upd_var = "mean_b", "var_b·N/(N−1)  (UNBIASED, N values per channel)"
        lines += [
            f"  and one step updates, with m = {factor}:",
            f"    bn.running_mean ← (1 − m)·bn.running_mean + m·{upd_mean}",
            f"    bn.running_var  ← (1 − m)·bn.running_var + m·{upd_var}",
        ]
        if a.kind is LayerKind.BATCH and a.num_batches_tracked is not None:
            lines.append("    bn.num_batches_tracked ← bn.num_batches_tracked + 1")
        lines += [
            "Eval mode (bn.training is False): the running statistics",
            f"  y = {gamma}(x − bn.running_mean) / sqrt(bn.running_var + bn.eps){beta}",
        ]
    else:
        lines += [
            "Eval mode: track_running_stats=False, so eval mode uses batch statistics too "
            "(same formula as train mode)"
        ]
    return lines


def snippet(v: LayerView) -> str:
    """Runnable PyTorch that reproduces the layer's output from its attributes."""
    a = v.attrs
    if a.kind is LayerKind.INSTANCE:
        stats = "    dims = list(range(2, x.dim()))  # per sample and channel"
    else:
        stats = "    dims = [0, *range(2, x.dim())]  # every dim but the channels (dim 1)"
    if a.kind is LayerKind.FROZEN:
        use_batch = "False:  # a frozen BN always uses its buffers"
    else:
        use_batch = "bn.training or bn.running_mean is None:"
    return "\n".join(
        [
            "import torch",
            "",
            f'bn = model.get_submodule("{v.name}")',
            "",
            "def by_hand(bn, x):",
            stats,
            "    shape = [1, -1] + [1] * (x.dim() - 2)  # a per-channel vector, broadcast",
            f"    if {use_batch}",
            "        mean = x.mean(dims, keepdim=True)",
            "        var = x.var(dims, unbiased=False, keepdim=True)  # biased, as BN uses",
            "    else:",
            "        mean = bn.running_mean.view(shape)",
            "        var = bn.running_var.view(shape)",
            "    y = (x - mean) / torch.sqrt(var + bn.eps)",
            "    if bn.weight is not None:",
            "        y = y * bn.weight.view(shape) + bn.bias.view(shape)",
            "    return y",
            "",
            f"# x: the layer's input, {v.input_dims}",
            "# torch.testing.assert_close(by_hand(bn, x), bn(x))",
        ]
    )


def render_layer(v: LayerView) -> str:
    a = v.attrs
    momentum = "None (cumulative average)" if a.momentum is None else _fmt(a.momentum)
    parts = [
        f"{v.name}: {a.type_name} ({a.kind.value}), input {v.input_dims}",
        f"  C = {a.num_features}, eps = {_fmt(a.eps)}, momentum = {momentum}, affine = "
        f"{a.affine}, track_running_stats = {a.has_running_stats}, num_batches_tracked = "
        f"{a.num_batches_tracked if a.num_batches_tracked is not None else '-'}, dtype = "
        f"{str(a.dtype).removeprefix('torch.')}",
    ]
    if a.overrides_forward:
        parts.append(f"  note: {a.type_name} overrides forward; the formulas below are plain BN")
    parts += ["", _channel_table(v), "", *formulas_text(v), "", "Reproduce it:", "", snippet(v)]
    if v.result is not None:
        m = v.result.metrics
        parts += [
            "",
            f"Measured ({m.seen.calls} calls, N = {m.seen.values_per_channel} values per channel):",
            f"  train mode: max abs err {_fmt(m.train.recon.max_err)} "
            f"({_fmt(m.train.recon.ratio)}x the tolerance)",
            f"  eval mode:  max abs err {_fmt(m.eval.recon.max_err)} "
            f"({_fmt(m.eval.recon.ratio)}x the tolerance)",
            f"  running update: {_fmt(m.update.mean_ratio)}x (mean), "
            f"{_fmt(m.update.var_ratio)}x (var) the tolerance",
            f"  verdict: {v.result.verdict}",
        ]
        parts += [f"  {f.severity.label.upper()} {f.code}: {f.message}" for f in v.result.findings]
    return "\n".join(parts) + "\n"
