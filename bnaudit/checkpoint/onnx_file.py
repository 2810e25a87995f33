"""ONNX models read as hostile input: size and node limits, every tensor's byte count checked,
external data only from inside the model's own folder.

An ONNX file is protobuf: parsing it runs no code. What it can do is point outside itself. An
initializer's external data names a file by a relative path, which onnx's own loader followed
out of the model's folder more than once (`../`, absolute paths, symlinks: CVE-2022-25882,
CVE-2024-27318, CVE-2026-27489). So the file is parsed with external data left unresolved, every
location is checked here (no `..` part, not absolute, resolving, symlinks followed, to a regular
file inside the model's folder, holding the bytes the tensor claims), and only then read, by
bnaudit, into the model in memory. The user's file is never written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from bnaudit.core.errors import BnauditError, CheckpointError, describe
from bnaudit.core.limits import MAX_ONNX_BYTES, MAX_ONNX_NODES
from bnaudit.core.untrusted import quote

EXTRA = (
    "reading ONNX models needs the onnx extra: pip install 'bnaudit[onnx]' (onnx and onnxruntime)"
)
_MAX_DEPTH = 32  # subgraphs (If/Loop bodies) nested deeper than this are refused


def onnx_module() -> Any:
    """The `onnx` package, or a BnauditError that names the extra to install."""
    try:
        import onnx
    except ImportError:
        raise BnauditError(EXTRA) from None
    return onnx


@dataclass(frozen=True)
class OnnxFile:
    """A parsed ONNX model whose external data, if any, is checked and read into it."""

    path: Path
    model: Any  # onnx.ModelProto, self-contained
    nodes: int  # in every graph, subgraphs included
    external: int  # tensors whose data came from external files


def read_onnx(path: Path) -> OnnxFile:
    """Parse `path` safely; any problem is one CheckpointError naming the file and the cause."""
    onnx = onnx_module()
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise CheckpointError(
            f"{path}: an ONNX file of {size} bytes, over protobuf's limit of {MAX_ONNX_BYTES} "
            "(MAX_ONNX_BYTES); a larger model keeps its weights as external data"
        )
    try:
        # From bytes: onnx.load would resolve external data itself, before any check.
        model = onnx.load_model_from_string(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({describe(exc)})") from exc
    except Exception as exc:  # protobuf's DecodeError, or a RecursionError from deep nesting
        raise CheckpointError(
            f"{path}: an ONNX file that is truncated or damaged (protobuf cannot parse it: "
            f"{describe(exc)}); export it again, or fetch it again"
        ) from exc
    nodes = _count_nodes(path, model.graph)
    _check_complete(path, model.graph)
    external = _external_tensors(path, model.graph)
    _check_embedded(path, model.graph)
    _read_external(path, external)
    return OnnxFile(path, model, nodes, len(external))


def graphs(graph: Any, depth: int = 0) -> Iterator[Any]:
    """`graph` and every subgraph in its nodes' attributes, depth first."""
    yield graph
    if depth >= _MAX_DEPTH:
        return
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from graphs(attr.g, depth + 1)
            for sub in attr.graphs:
                yield from graphs(sub, depth + 1)


def tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of the model: initializers, and tensor attributes (Constant nodes)."""
    for g in graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _count_nodes(path: Path, graph: Any) -> int:
    count = 0
    for g in graphs(graph):
        count += len(g.node)
        if count > MAX_ONNX_NODES:
            raise CheckpointError(
                f"{path}: an ONNX graph of more than {MAX_ONNX_NODES} nodes, bnaudit's limit "
                "(MAX_ONNX_NODES); exported vision models have a few thousand: the file is "
                "crafted or not a model bnaudit can audit"
            )
    return count


def _check_complete(path: Path, graph: Any) -> None:
    """Every graph output is made by a node, an initializer or an input: a file cut between two
    fields parses, but loses the nodes after the cut."""
    made = {o for n in graph.node for o in n.output}
    made |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
    if not graph.output:
        raise CheckpointError(
            f"{path}: an ONNX model without graph outputs: truncated or damaged; export it again"
        )
    for out in graph.output:
        if out.name not in made:
            raise CheckpointError(
                f"{path}: graph output {quote(out.name)} is made by no node: the file is "
                "truncated or damaged; export it again, or fetch it again"
            )


def _claimed_bytes(path: Path, t: Any) -> int:
    """Bytes the tensor's dims and data type need (refusing negative dims or unknown types)."""
    from onnx import helper

    if any(d < 0 for d in t.dims):
        raise CheckpointError(
            f"{path}: tensor {quote(t.name)} has a negative dimension {list(t.dims)}: damaged"
        )
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: tensor {quote(t.name)} has data type {t.data_type}, which bnaudit does not "
            "read"
        ) from exc
    return math.prod(t.dims) * itemsize


def _check_embedded(path: Path, graph: Any) -> None:
    """A tensor inside the file holds what its dims claim: a 2 GB claim in a few bytes is
    refused before onnxruntime or numpy allocates it."""
    from onnx import TensorProto

    for t in tensors(graph):
        if t.data_location == TensorProto.EXTERNAL or t.data_type == TensorProto.STRING:
            continue
        need = _claimed_bytes(path, t)
        if t.raw_data:
            held = len(t.raw_data)
        else:
            fields = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
            count = sum(len(getattr(t, f)) for f in fields)
            # Typed fields hold one element each (two for complex), whatever the data type.
            need = math.prod(t.dims) * (2 if t.data_type in (14, 15) else 1)
            held = count
        if held != need:
            unit = "bytes" if t.raw_data else "values"
            raise CheckpointError(
                f"{path}: tensor {quote(t.name)} claims {need} {unit} (dims {list(t.dims)}) but "
                f"holds {held}: the file is crafted or damaged; export it again"
            )


def _external_tensors(path: Path, graph: Any) -> list[tuple[Any, Path, int, int]]:
    """Every external tensor with its checked file, offset and byte count."""
    from onnx import TensorProto

    folder = path.parent.resolve()
    found = []
    total = 0
    for t in tensors(graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        target = _location(path, folder, t.name, info.get("location", ""))
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError as exc:
            raise CheckpointError(
                f"{path}: tensor {quote(t.name)} has external-data offset/length that are not "
                f"numbers ({describe(exc)}): damaged"
            ) from exc
        need = _claimed_bytes(path, t)
        size = target.stat().st_size
        if length is not None and length != need:
            raise CheckpointError(
                f"{path}: tensor {quote(t.name)} claims {length} bytes of external data but its "
                f"dims {list(t.dims)} need {need}: crafted or damaged"
            )
        if offset < 0 or offset + need > size:
            raise CheckpointError(
                f"{path}: tensor {quote(t.name)} claims {need} bytes at offset {offset} of "
                f"{quote(target.name)}, which holds {size}: truncated, crafted or damaged"
            )
        total += need
        if total > MAX_ONNX_BYTES:
            raise CheckpointError(
                f"{path}: external data of more than {MAX_ONNX_BYTES} bytes (MAX_ONNX_BYTES); "
                "bnaudit reads a model of at most 2 GiB"
            )
        found.append((t, target, offset, need))
    return found


def _location(path: Path, folder: Path, name: str, location: str) -> Path:
    """The external-data file, refused unless it is a regular file inside the model's folder."""
    where = f"{path}: tensor {quote(name)} keeps its data in {quote(location)}"
    parts = PureWindowsPath(location).parts + PurePosixPath(location).parts
    if not location or "\x00" in location:
        raise CheckpointError(f"{where}: no valid file name; the file is damaged")
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).anchor:
        raise CheckpointError(
            f"{where}, an absolute path: refused, external data must sit in the model's folder "
            f"({folder}); an exporter writes a relative name"
        )
    if ".." in parts:
        raise CheckpointError(
            f"{where}, which climbs out with '..': refused, external data must sit in the "
            f"model's folder ({folder})"
        )
    try:
        target = (folder / location).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{where}, which cannot be opened ({describe(exc)})") from exc
    if not target.is_relative_to(folder):
        raise CheckpointError(
            f"{where}, a link that leads out of the model's folder (to {target}): refused, "
            "external data must sit inside it"
        )
    if not target.is_file():
        raise CheckpointError(f"{where}, which is not a regular file")
    return target


def _read_external(path: Path, external: list[tuple[Any, Path, int, int]]) -> None:
    """Read each checked external tensor into the model in memory (the file is left alone)."""
    from onnx import TensorProto

    for t, target, offset, need in external:
        try:
            with target.open("rb") as f:
                f.seek(offset)
                data = f.read(need)
        except OSError as exc:
            raise CheckpointError(
                f"{path}: cannot read the external data of {quote(t.name)} ({describe(exc)})"
            ) from exc
        if len(data) != need:  # the file shrank since it was checked
            raise CheckpointError(f"{path}: the external data of {quote(t.name)} is truncated")
        t.raw_data = data
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
