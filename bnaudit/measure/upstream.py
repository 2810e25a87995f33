"""Which weights lie upstream of each BatchNorm layer: what its input statistics depend on.

A BN layer's running statistics describe its input, and that input depends on every weight
before it in the forward pass (convs, linears, the γ and β of earlier BN layers), never on its
own γ and β, nor on the running statistics of the layers before it (in train mode, which is when
statistics are updated, earlier layers normalise with batch statistics). Two ways to know
"before it":

- with the model, its dataflow graph: torch.fx traces it with every BN-like layer kept a leaf
  (as the fold pairing does), and a layer's upstream is every weight of every node its input
  is computed from; the conv/linear nearest to it is the one that feeds it;
- without, the state-dict order: torch saves modules in registration order, which is the order
  of the forward pass in most models but not all (a head registered before the body, parallel
  branches); the report says which was used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from bnaudit.checkpoint.bn_groups import find_bn_groups
from bnaudit.core.layers import find_bn_layers
from bnaudit.measure.fx_graph import FOLDABLE, Tracer

STATS = ("running_mean", "running_var", "num_batches_tracked")
TRACED = "the model's dataflow (torch.fx trace of --model, BN layers kept as leaves)"
ORDER = "state-dict order (torch saves modules in registration order)"


@dataclass(frozen=True)
class Upstream:
    """Per BN layer (name as in the state dict), the state-dict keys of the weights before it."""

    method: str  # TRACED or ORDER
    weights: Mapping[str, tuple[str, ...]]
    fed_by: Mapping[str, str] = field(default_factory=dict)  # BN → its nearest conv/linear
    note: str = ""  # why the trace was not used, when it was asked for


def stat_keys(state_dict: Mapping[str, object]) -> set[str]:
    """The running statistics and counters of every BN key group: not weights."""
    return {
        key for g in find_bn_groups(state_dict) for attr, key in g.keys.items() if attr in STATS
    }


def weight_keys(state_dict: Mapping[str, object]) -> list[str]:
    """Every tensor key that may shape a later layer's input, in state-dict order."""
    stats = stat_keys(state_dict)
    return [k for k, v in state_dict.items() if isinstance(v, Tensor) and k not in stats]


def by_order(state_dict: Mapping[str, object]) -> Upstream:
    """Upstream of each BN group: the weights saved before its first key."""
    position = {k: i for i, k in enumerate(state_dict)}
    first = {
        min(g.keys.values(), key=position.__getitem__): g.prefix for g in find_bn_groups(state_dict)
    }
    weights: dict[str, tuple[str, ...]] = {}
    stats = stat_keys(state_dict)
    seen: list[str] = []
    for key, value in state_dict.items():
        if key in first:
            weights[first[key]] = tuple(seen)
        if isinstance(value, Tensor) and key not in stats:
            seen.append(key)
    return Upstream(ORDER, weights)


def by_dataflow(model: nn.Module) -> Upstream | str:
    """Upstream of each BN layer from the model's traced graph, or why it cannot be traced.

    Reads the module structure only: nothing runs, nothing changes.
    """
    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # data-dependent control flow, among others
        text = str(exc).strip()
        return f"torch.fx could not trace the model ({text.splitlines()[0] if text else exc!r})"
    modules = dict(model.named_modules())
    state = model.state_dict()
    weights = weight_keys(state)
    bns = dict(find_bn_layers(model))

    by_module: dict[str, set[str]] = {}
    for k in weights:
        by_module.setdefault(k.rpartition(".")[0], set()).add(k)

    every = set(weights)

    def own(target: str) -> frozenset[str]:
        """The weights of a leaf module (call_module) or the one weight (get_attr)."""
        keys = set(by_module.get(target, ())) | ({target} & every)
        module = modules.get(target)
        if module is not None and next(module.children(), None) is not None:
            prefix = f"{target}."  # a leaf with children of its own (a BN-like wrapper)
            keys |= {k for k in weights if k.startswith(prefix)}
        return frozenset(keys)

    # Per node, the weights its value is computed from (the graph is in topological order).
    before: dict[object, frozenset[str]] = {}
    upstream: dict[str, set[str]] = {}
    fed_by: dict[str, str] = {}
    for node in graph.nodes:
        inputs = node.all_input_nodes
        deps = frozenset().union(*(before[n] for n in inputs)) if inputs else frozenset()
        if node.op == "call_module" and str(node.target) in bns:
            name = str(node.target)
            upstream.setdefault(name, set()).update(deps)
            fed_by.setdefault(name, _nearest_foldable(node, modules))
        if node.op in ("call_module", "get_attr"):
            deps = deps | own(str(node.target))
        before[node] = deps
    order = {k: i for i, k in enumerate(weights)}
    return Upstream(
        TRACED,
        {bn: tuple(sorted(keys, key=order.__getitem__)) for bn, keys in upstream.items()},
        {bn: conv for bn, conv in fed_by.items() if conv},
    )


def _nearest_foldable(node, modules: Mapping[str, nn.Module]) -> str:
    """The conv/linear nearest upstream of `node`, breadth first; "" when there is none."""
    queue, seen = list(node.all_input_nodes), set()
    while queue:
        n = queue.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and isinstance(modules.get(str(n.target)), FOLDABLE):
            return str(n.target)
        queue.extend(n.all_input_nodes)
    return ""
