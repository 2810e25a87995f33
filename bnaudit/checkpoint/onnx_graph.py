"""What an ONNX graph tells about BatchNorm: its BatchNormalization nodes, and the Conv/Gemm
nodes a BN may have been folded into.

The exporters keep the PyTorch names where they can: initializers named `bn2.running_mean`
(both exporters), node names `/bn2/BatchNormalization` (the legacy exporter) and a
`pkg.torch.onnx.name_scopes` entry naming the module (the dynamo exporter, also on the Conv or
Gemm a BN was folded into). A node's layer name is taken from these, else from the node itself.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bnaudit.checkpoint.onnx_file import OnnxFile
from bnaudit.core.untrusted import clean

_SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module path of a node
_BN_INPUTS = ("weight", "bias", "running_mean", "running_var")  # after X, in ONNX's order


@dataclass(frozen=True)
class BnNode:
    """One BatchNormalization node, with its parameters where the graph holds them as constants."""

    name: str  # the layer's name (the PyTorch module path where the file tells it)
    node: str  # the node's own name
    output: str  # the normalised tensor
    eps: float
    training: bool  # training_mode=1: normalises with batch statistics
    tensors: dict[str, Tensor]  # weight, bias, running_mean, running_var (those found)
    problem: str = ""  # why a parameter is missing: not a constant of the graph


@dataclass(frozen=True)
class LinearNode:
    """A Conv or Gemm with constant weights: output channels on dim 0 of `weight`."""

    node: str
    op: str
    output: str
    weight: Tensor
    bias: Tensor | None
    scopes: tuple[str, ...] = ()  # module paths the exporter recorded for it


@dataclass(frozen=True)
class OnnxGraph:
    file: OnnxFile
    bn: tuple[BnNode, ...]
    linear: tuple[LinearNode, ...]
    inputs: tuple[str, ...]  # graph inputs that are not initializers
    outputs: tuple[str, ...]
    dtype: torch.dtype  # of the first graph input (the artifact's precision)
    opset: int = 0
    notes: tuple[str, ...] = field(default=())


def read_graph(file: OnnxFile) -> OnnxGraph:
    """The BN and Conv/Gemm nodes of the main graph, their constants as CPU tensors."""
    from onnx import helper

    graph = file.model.graph
    consts = _constants(graph)
    bn, linear = [], []
    seen: dict[str, int] = {}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "BatchNormalization" and node.output:
            named = list(zip(_BN_INPUTS, node.input[1:5], strict=False))
            found = {k: consts[i] for k, i in named if i in consts}
            missing = [k for k, i in named if i not in consts]
            name = _unique(_layer_name(node, found.keys(), node.input[1:5]), seen)
            problem = (
                f"{', '.join(missing)} computed in the graph, not constants" if missing else ""
            )
            bn.append(
                BnNode(
                    name,
                    clean(node.name),
                    node.output[0],
                    float(attrs.get("epsilon", 1e-5)),
                    bool(attrs.get("training_mode", 0)),
                    found,
                    problem,
                )
            )
        elif node.op_type in ("Conv", "Gemm") and len(node.input) > 1 and node.input[1] in consts:
            weight = consts[node.input[1]]
            if node.op_type == "Gemm" and not attrs.get("transB", 0):
                weight = weight.t()  # Gemm computes x·B: output channels on B's dim 1
            bias = consts.get(node.input[2]) if len(node.input) > 2 else None
            scopes = tuple(_scopes(node))
            linear.append(
                LinearNode(clean(node.name), node.op_type, node.output[0], weight, bias, scopes)
            )
    initializers = {t.name for t in graph.initializer}
    inputs = tuple(i.name for i in graph.input if i.name not in initializers)
    # The artifact's precision is its least precise float: a float32 graph with a float16 BN.
    dtypes = [_dtype(graph, inputs)]
    dtypes += [t.dtype for n in bn for t in n.tensors.values()]
    dtypes += [n.weight.dtype for n in linear]
    dtype = max(dtypes, key=lambda d: _PRECISION.get(d, 0))
    opset = max(
        (o.version for o in file.model.opset_import if o.domain in ("", "ai.onnx")), default=0
    )
    return OnnxGraph(
        file, tuple(bn), tuple(linear), inputs, tuple(o.name for o in graph.output), dtype, opset
    )


def _constants(graph: Any) -> dict[str, Tensor]:
    """Initializers and Constant-node values by name, as CPU tensors (float ones only: BN and
    conv parameters)."""
    from onnx import numpy_helper

    consts = {}
    for t in graph.initializer:
        consts[t.name] = t
    for node in graph.node:  # in graph order: an Identity follows what it forwards
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    consts[node.output[0]] = attr.t
        # The legacy exporter shares equal initializers (a fresh BN's running_var and weight)
        # through Identity nodes.
        if node.op_type == "Identity" and node.output and node.input and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    out = {}
    for name, t in consts.items():
        if t.data_type not in (1, 10, 11, 16):  # float, float16, double, bfloat16
            continue
        array = numpy_helper.to_array(t)
        if t.data_type == 16:  # numpy has no bfloat16: through float32, exact
            out[name] = torch.from_numpy(array.astype("float32")).to(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(array.copy())
    return out


def _layer_name(node: Any, found: Any, inputs: Any) -> str:
    """The module path: from `<layer>.running_mean`, the dynamo name scopes, the legacy node
    name `/a/b/BatchNormalization`, else the node's own name or output."""
    names = dict(zip(_BN_INPUTS, inputs, strict=False))
    mean = names.get("running_mean", "")
    if mean.endswith(".running_mean"):
        return clean(mean.removesuffix(".running_mean"))
    scopes = _scopes(node)
    if scopes:
        return clean(scopes[-1])
    parts = [p for p in node.name.split("/") if p]
    if len(parts) >= 2 and parts[-1].startswith("BatchNormalization"):
        return clean(parts[-2])
    return clean(node.name or node.output[0])


def _scopes(node: Any) -> list[str]:
    """Module paths from the dynamo exporter's name scopes: ['', 'layer1', '0', 'bn1', op]."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return []
            if isinstance(scopes, list) and all(isinstance(s, str) for s in scopes):
                path = [s for s in scopes[:-1] if s]
                if any("." in s for s in path):  # already qualified: layer1, layer1.0, ...
                    return path
                return [".".join(path[: i + 1]) for i in range(len(path))]
    return []


def _unique(name: str, seen: dict[str, int]) -> str:
    seen[name] = seen.get(name, 0) + 1
    return name if seen[name] == 1 else f"{name}#{seen[name]}"


_DTYPES: Mapping[int, torch.dtype] = {
    1: torch.float32,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


_PRECISION = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def _dtype(graph: Any, inputs: tuple[str, ...]) -> torch.dtype:
    for i in graph.input:
        if i.name in inputs and i.type.HasField("tensor_type"):
            return _DTYPES.get(i.type.tensor_type.elem_type, torch.float32)
    return torch.float32
