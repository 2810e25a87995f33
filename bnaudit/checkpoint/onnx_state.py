"""An ONNX model as the static audit reads a checkpoint: each BatchNormalization node's
parameters as a state dict (`<layer>.weight`, `.bias`, `.running_mean`, `.running_var`), with
its eps, and the nodes that run in training mode."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from bnaudit.checkpoint.onnx_file import read_onnx
from bnaudit.checkpoint.onnx_graph import read_graph
from bnaudit.checkpoint.refusals import check_bn_tensors
from bnaudit.core.layers import UNKNOWN_MOMENTUM, KnownAttrs
from bnaudit.core.untrusted import quote

ONNX_TYPE = "BatchNormalization (ONNX)"


@dataclass(frozen=True)
class OnnxState:
    state_dict: dict[str, Tensor]
    known: dict[str, KnownAttrs]  # layer → its node's eps (ONNX has no momentum)
    training: frozenset[str]  # layers whose node has training_mode=1
    notes: tuple[str, ...]


def onnx_state(path: Path) -> OnnxState:
    """The BN parameters of an ONNX model, read safely (`bnaudit.checkpoint.onnx_file`)."""
    file = read_onnx(path)
    graph = read_graph(file)
    state: dict[str, Tensor] = {}
    known = {}
    training = set()
    skipped = []
    for bn in graph.bn:
        if bn.problem or not {"running_mean", "running_var"} <= bn.tensors.keys():
            skipped.append(f"{quote(bn.name)} ({bn.problem or 'no running statistics'})")
            continue
        for attr, t in bn.tensors.items():
            state[f"{bn.name}.{attr}"] = t
        known[bn.name] = KnownAttrs(ONNX_TYPE, bn.eps, UNKNOWN_MOMENTUM)
        if bn.training:
            training.add(bn.name)
    check_bn_tensors(state, path)
    external = f", {file.external} tensors read from external data" if file.external else ""
    notes = [
        f"checkpoint: an ONNX model (opset {graph.opset}, {file.nodes} nodes{external}); "
        f"{len(graph.bn)} BatchNormalization nodes, each judged from its initializers and eps",
        "BN layers folded into a Conv or Gemm by the exporter are no longer visible as BN: audit "
        "the model against its checkpoint (--against CKPT --model ... --data ...) to find them",
    ]
    if skipped:
        notes.append(f"BatchNormalization nodes not audited: {', '.join(skipped)}")
    return OnnxState(state, known, frozenset(training), tuple(notes))
