"""Each BN layer of the checkpoint's model found in the artifact, and judged there.

A layer is looked for first as a BatchNormalization node (or a program's BN layer): by its
name, which the exporters keep, else by its gamma and beta, which a stale export still shares.
Then as the conv/linear it was folded into: the conv that feeds it in the model (the dataflow
pairs of `bnaudit.measure.dataflow`) has a counterpart whose weights are the model's, scaled per
output channel (W' = W·γ/sqrt(σ² + ε)), whatever statistics the fold used. That scaling test
finds the folded conv without trusting a name, so a stale fold is still found, and judged stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnaudit.artifact.artifacts import Artifact
from bnaudit.checkpoint.onnx_graph import BnNode, LinearNode
from bnaudit.core.layers import LayerAttrs
from bnaudit.verdict.placement import judge_fold, judge_node, missing
from bnaudit.verdict.results import Finding, Placement

_ALIGNED = 1 - 1e-4  # cosine of each output channel's weights, artifact against model


@dataclass(frozen=True)
class Place:
    """One checkpoint BN layer in the artifact: its placement, findings and exposed tensor."""

    layer: str
    placement: Placement
    findings: tuple[Finding, ...]
    tensor: str = ""  # the artifact tensor holding this layer's output ("" when none)


def locate(
    layers: Iterable[tuple[str, nn.Module]],
    attrs: Mapping[str, LayerAttrs],
    convs: Mapping[str, tuple[str, nn.Module]],
    artifact: Artifact,
) -> list[Place]:
    """Every layer's place; `convs`: BN layer → the conv/linear (name, module) that feeds it
    alone in the model."""
    layers = list(layers)
    # A node named after a layer of the model is that layer's: never matched to another by value.
    named = {name for name, _ in layers}
    free = list(artifact.bn)
    places = []
    for name, _ in layers:
        a = attrs[name]
        node = _bn_node(name, a, [n for n in free if n.name == name or n.name not in named])
        if node is not None:
            free.remove(node)
            places.append(_at_node(name, a, node))
            continue
        conv_name, conv = convs.get(name, ("", None))
        linear = _folded_into(name, conv, artifact.linear) if conv is not None else None
        if linear is not None and conv is not None:
            w = conv.weight.detach()
            b = None if conv.bias is None else conv.bias.detach()
            folded = (linear.weight, linear.bias)
            placement, found = judge_fold(name, a, (w, b), folded, linear.node)
            places.append(Place(name, placement, found, linear.output))
            continue
        why = "no BatchNormalization node with its name or its gamma and beta"
        why += (
            f", and no Conv/Gemm whose weights are those of {conv_name} scaled per channel "
            "(an unscaled copy of them means the BN was dropped)"
            if conv is not None
            else ", and no conv/linear feeds it alone in the model, to be folded into"
        )
        placement, found = missing(name, why)
        places.append(Place(name, placement, found))
    return places


def _at_node(name: str, a: LayerAttrs, node: BnNode) -> Place:
    if node.problem or not {"running_mean", "running_var"} <= node.tensors.keys():
        placement, found = missing(name, f"its node {node.node} has {node.problem or 'no stats'}")
        return Place(name, placement, found, node.output)
    where = node.node if node.node == name else f"{node.node} ({name})"
    placement, found = judge_node(
        name, a, node.tensors, eps=node.eps, training=node.training, where=where
    )
    return Place(name, placement, found, node.output)


def _bn_node(name: str, a: LayerAttrs, free: list[BnNode]) -> BnNode | None:
    for node in free:
        if node.name == name:
            return node
    if a.weight is None or a.bias is None:
        return None
    same = [
        n
        for n in free
        if _equal(n.tensors.get("weight"), a.weight) and _equal(n.tensors.get("bias"), a.bias)
    ]
    return same[0] if len(same) == 1 else None


def _equal(t: Tensor | None, want: Tensor) -> bool:
    if t is None or t.shape != want.shape:
        return False
    return bool(torch.equal(t.double(), want.to(t.dtype).double()))


def _folded_into(bn: str, conv: nn.Module, linear: tuple[LinearNode, ...]) -> LinearNode | None:
    """The artifact's Conv/Gemm holding `conv`'s weights scaled per output channel."""
    w = conv.weight.detach().double()
    flat = w.reshape(w.shape[0], -1)
    norm = flat.norm(dim=1)
    best, best_cos = None, _ALIGNED
    for node in linear:
        if tuple(node.weight.shape) != tuple(w.shape):
            continue
        got = node.weight.double().reshape(w.shape[0], -1)
        if torch.equal(got, flat.to(node.weight.dtype).double()):
            continue  # the model's conv itself, not scaled: nothing was folded into it
        cos = (got * flat).sum(1) / (got.norm(dim=1) * norm).clamp_min(1e-300)
        live = norm > 0
        worst = float(cos[live].abs().min()) if bool(live.any()) else 0.0
        named = bn in node.scopes
        if named and worst >= _ALIGNED:
            return node
        if worst > best_cos:
            best, best_cos = node, worst
    return best
