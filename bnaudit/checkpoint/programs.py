"""Compiled programs: TorchScript archives and torch.export .pt2 files, loaded only with --trust.

Both are code: loading one runs it. Neither can be audited with hooks (TorchScript runs compiled
code, an exported program is a flat graph of aten ops), so bnaudit takes what they still tell:
the state dict, and each BN layer's eps and momentum (from the scripted submodule, or from the
batch-norm call in the graph). The static audit judges those; `--model` loads the state dict
into the user's architecture for the full audit.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnaudit.checkpoint.formats import FileKind, ZipArchive
from bnaudit.core.errors import CheckpointError, describe
from bnaudit.core.layers import UNKNOWN_MOMENTUM, KnownAttrs

# aten batch-norm ops in exported graphs → argument index of (running_mean, training, momentum,
# eps); training None: the op is eval-only.
_BN_OPS: dict[str, tuple[int, int | None, int, int]] = {
    "aten.batch_norm.default": (3, 5, 6, 7),
    "aten._native_batch_norm_legit_no_training.default": (3, None, 5, 6),
    "aten._native_batch_norm_legit_functional.default": (3, 5, 6, 7),
    "aten._native_batch_norm_legit.default": (3, 5, 6, 7),
    "aten.native_batch_norm.default": (3, 5, 6, 7),
}


@dataclass(frozen=True)
class Program:
    state_dict: dict[str, Tensor]
    known: dict[str, KnownAttrs]  # BN layer prefix → its eps and momentum
    notes: tuple[str, ...]
    runnable: Any = None  # what runs it: the ScriptModule, or the ExportedProgram's module()
    training: frozenset[str] = frozenset()  # BN layer prefixes that run in train mode


def load_program(path: Path, kind: FileKind, archive: ZipArchive) -> Program:
    """Load a TorchScript or torch.export file on the CPU; the caller has the user's --trust."""
    archive.verify(archive.names)  # torch reads every record: check them all first
    try:
        with warnings.catch_warnings():
            # torch's deprecation notices about its own serialization internals are not the
            # user's concern, and would turn into errors under `python -W error`.
            warnings.simplefilter("ignore")
            program = _script(path) if kind is FileKind.TORCHSCRIPT else _export(path)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: {kind.value} that torch cannot load ({describe(exc)}); was it saved by "
            "a newer torch, or damaged?"
        ) from exc
    if not program.state_dict:
        raise CheckpointError(f"{path}: {kind.value} without parameters or buffers")
    return program


def _script(path: Path) -> Program:
    module = torch.jit.load(str(path), map_location="cpu")
    known = {}
    training = set()
    for name, sub in module.named_modules():
        type_name = getattr(sub, "original_name", "")
        if "BatchNorm" in type_name and not hasattr(sub, "eps"):  # traced: eps is in the code
            traced = _traced_call(sub)
            if traced is not None:
                known[name] = KnownAttrs(type_name, traced[1])
                if traced[0]:
                    training.add(name)
        if "BatchNorm" in type_name and hasattr(sub, "eps"):
            if sub.training:  # saved in train mode: the loaded module normalises by batch
                training.add(name)
            momentum = getattr(sub, "momentum", UNKNOWN_MOMENTUM)
            known[name] = KnownAttrs(
                type_name, float(sub.eps), None if momentum is None else float(momentum)
            )
    note = (
        "loaded with --trust: a TorchScript archive runs compiled code that cannot be hooked; "
        "bnaudit reads its state dict, and each BN layer's class, eps and momentum"
    )
    return Program(dict(module.state_dict()), known, (note,), module, frozenset(training))


_TRACED_BN = re.compile(r"torch\.batch_norm\(([^()]*)\)")


def _traced_call(sub: Any) -> tuple[bool, float] | None:
    """(training, eps) of a traced BN layer, from the one batch_norm call of its code: tracing
    keeps the values it saw as constants, not the attributes."""
    try:
        found = _TRACED_BN.findall(sub.code)
    except RuntimeError:
        return None
    if len(found) != 1:
        return None
    args = [a.strip() for a in found[0].split(",")]
    if len(args) != 9 or args[5] not in ("True", "False"):
        return None
    try:
        return args[5] == "True", float(args[7])
    except ValueError:
        return None


def _export(path: Path) -> Program:
    program = torch.export.load(str(path))
    state = {k: v for k, v in program.state_dict.items() if isinstance(v, Tensor)}
    note = (
        "loaded with --trust: a torch.export program is a graph of aten ops that cannot be "
        "hooked; bnaudit reads its state dict, and each BN layer's eps (and momentum where the "
        "graph records it) from its batch-norm call"
    )
    known, training = _export_known(program)
    return Program(state, known, (note,), program.module(), frozenset(training))


def _export_known(program: Any) -> tuple[dict[str, KnownAttrs], set[str]]:
    buffers = program.graph_signature.inputs_to_buffers  # placeholder name → state-dict key
    known = {}
    trained = set()
    for node in program.graph.nodes:
        spec = _BN_OPS.get(str(node.target)) if node.op == "call_function" else None
        if spec is None or len(node.args) <= spec[3]:
            continue
        mean_i, train_i, momentum_i, eps_i = spec
        key = buffers.get(getattr(node.args[mean_i], "name", None), "")
        if not key.endswith("running_mean"):
            continue
        training = train_i is not None and bool(node.args[train_i])
        if training:
            trained.add(key.rpartition(".")[0])
        momentum = float(node.args[momentum_i])
        # In eval mode the op gets the layer's momentum, or 0.0 for momentum=None; in train mode
        # a cumulative average would show its per-step factor instead: neither is trusted here.
        known[key.rpartition(".")[0]] = KnownAttrs(
            "BatchNorm (torch.export)",
            float(node.args[eps_i]),
            momentum if not training and momentum > 0 else UNKNOWN_MOMENTUM,
        )
    return known, trained
