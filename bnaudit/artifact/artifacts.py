"""A deployed artifact opened for comparison: what it holds for BN, and how to run it.

ONNX models are read safely (`bnaudit.checkpoint.onnx_file`) and run by onnxruntime from an
in-memory copy, which may expose a layer's tensor as an extra graph output; the user's file is
never written. TorchScript archives and torch.export programs are code: loading one runs it,
so they need --trust, as for `check`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from bnaudit.checkpoint.formats import FileKind, detect
from bnaudit.checkpoint.onnx_graph import BnNode, LinearNode, OnnxGraph
from bnaudit.core.errors import BnauditError, CheckpointError, DataError, describe
from bnaudit.core.paths import input_problem

ORT_EXTRA = (
    "running an ONNX model needs onnxruntime: pip install 'bnaudit[onnx]' (onnx and onnxruntime)"
)


@dataclass(frozen=True)
class Artifact:
    path: Path
    kind: FileKind
    bn: tuple[BnNode, ...]
    linear: tuple[LinearNode, ...]  # Conv/Gemm nodes a BN may be folded into (ONNX only)
    dtype: torch.dtype  # the precision it runs in
    program: Any  # the OnnxGraph, or the loaded module
    notes: tuple[str, ...] = ()

    @property
    def exposes(self) -> bool:
        """Whether a layer's own output can be read from it (an extra ONNX graph output)."""
        return self.kind is FileKind.ONNX

    def runner(self, extra: Sequence[str] = ()) -> Runner:
        if self.kind is FileKind.ONNX:
            return OnnxRunner(self.path, self.program, tuple(extra))
        return ProgramRunner(self.program)


def open_artifact(path: Path, *, trust: bool) -> Artifact:
    """Read an ONNX model, or load a TorchScript or torch.export program (with `trust`)."""
    problem = input_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        kind, archive = detect(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({describe(exc)})") from exc
    if kind is FileKind.ONNX:
        from bnaudit.checkpoint.onnx_file import read_onnx
        from bnaudit.checkpoint.onnx_graph import read_graph

        graph = read_graph(read_onnx(path))
        nodes = f"opset {graph.opset}, {graph.file.nodes} nodes"
        note = f"artifact: an ONNX model ({nodes}), run by onnxruntime from a copy in memory"
        return Artifact(path, kind, graph.bn, graph.linear, graph.dtype, graph, (note,))
    if not kind.is_code:
        raise CheckpointError(
            f"{path}: {kind.value}, not a deployed artifact: check an ONNX model, a TorchScript "
            "archive or a torch.export program against the checkpoint (or audit this file "
            "with `bnaudit check` alone)"
        )
    if not trust:
        raise CheckpointError(
            f"{path}: refused to load: it is {kind.value}, which is compiled code: loading it "
            "runs that code. Rerun with --trust if you trust its source"
        )
    from bnaudit.checkpoint.programs import load_program

    assert archive is not None  # both are zip archives
    program = load_program(path, kind, archive)
    bn = []
    for prefix, known in program.known.items():
        tensors = {
            attr: program.state_dict[f"{prefix}.{attr}"].detach()
            for attr in ("weight", "bias", "running_mean", "running_var")
            if f"{prefix}.{attr}" in program.state_dict
        }
        bn.append(BnNode(prefix, prefix, "", known.eps, prefix in program.training, tensors))
    dtype = next((t.dtype for t in program.state_dict.values() if t.is_floating_point()), None)
    note = f"artifact: {kind.value}, loaded with --trust and run as loaded"
    return Artifact(path, kind, tuple(bn), (), dtype or torch.float32, program.runnable, (note,))


class Runner(Protocol):
    """Runs the artifact on the positional inputs of one batch: (output, exposed tensors)."""

    def __call__(self, args: tuple[Any, ...]) -> tuple[Any, dict[str, Tensor]]: ...


class ProgramRunner:
    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, args: tuple[Any, ...]) -> tuple[Any, dict[str, Tensor]]:
        try:
            with torch.no_grad():
                return self.module(*args), {}
        except Exception as exc:  # the program's own code: a shape guard, a device, ...
            raise DataError(
                f"the artifact cannot run on the batch ({describe(exc)}); was it exported for "
                "another input shape? Pass batches of the shape it was exported with"
            ) from exc


class OnnxRunner:
    """An onnxruntime session on an in-memory copy with `extra` tensors as graph outputs."""

    def __init__(self, path: Path, graph: OnnxGraph, extra: tuple[str, ...]) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BnauditError(ORT_EXTRA) from None
        from onnx import ModelProto, helper

        model = ModelProto()
        model.CopyFrom(graph.file.model)
        have = {o.name for o in model.graph.output}
        self.requested = extra
        self.extra = tuple(e for e in extra if e not in have)
        for name in self.extra:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its warnings are not the user's concern
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise CheckpointError(
                f"{path}: onnxruntime cannot load the model ({describe(exc)}); check it with "
                "onnx.checker.check_model, or export it again"
            ) from exc
        self.path = path
        self.inputs = [(i.name, i.type) for i in self.session.get_inputs()]
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, args: tuple[Any, ...]) -> tuple[Any, dict[str, Tensor]]:
        if len(args) != len(self.inputs) or not all(isinstance(a, Tensor) for a in args):
            raise DataError(
                f"{self.path}: the ONNX model takes {len(self.inputs)} input tensors "
                f"({', '.join(n for n, _ in self.inputs)}), the batch gives {len(args)} "
                "arguments; use --input to choose the model's input"
            )
        feed = {}
        for (name, kind), arg in zip(self.inputs, args, strict=True):
            dtype = torch.float16 if kind == "tensor(float16)" else None
            x = arg.detach().cpu()
            feed[name] = (x.to(dtype) if dtype is not None and x.is_floating_point() else x).numpy()
        try:
            outs = self.session.run(None, feed)
        except Exception as exc:
            raise DataError(
                f"{self.path}: onnxruntime cannot run the model on the batch ({describe(exc)})"
            ) from exc
        tensors = dict(zip(self.names, (torch.from_numpy(o) for o in outs), strict=True))
        main = [tensors[n] for n in self.names if n not in self.extra]
        exposed = {n: tensors[n] for n in self.requested if n in tensors}
        return (main[0] if len(main) == 1 else tuple(main)), exposed
