"""Fold pairs from the dataflow seen at run time: which conv/linear output each BN layer gets.

During one eval-mode forward (the audit's first), a forward hook on every conv/linear records
its output tensor, a TorchFunctionMode sees every torch operation that takes one, and a
forward-pre-hook on every BN layer looks at what it receives. A conv/linear and a BN are a fold
pair when every call of the BN receives that conv's output unchanged and nothing else uses it:
- unchanged: the same tensor, or an alias with the same storage, shape and strides (`detach`,
  eval-mode dropout), whose version counter is where the conv left it: an in-place op
  (`relu_`, `ReLU(inplace=True)`) keeps the tensor object and its data pointer but bumps it;
- nothing else: no other module, operation or the model's output takes it (folding would change
  that input too). Shape and dtype queries are not uses. When torch.fx traces the model, the
  conv's node must also have a single user there (`bnaudit.measure.fx_graph`).
Everything else is not a pair, with the reason (`Pairs.skipped`).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, _pop_mode, _push_mode
from torch.overrides import _get_current_function_mode as _current_mode
from torch.utils._pytree import tree_leaves

from bnaudit.core.layers import LayerAttrs, LayerKind, find_bn_layers
from bnaudit.measure.fx_graph import FOLDABLE, METADATA, TRANSPOSED, fx_users

METHOD = "observed dataflow on the first batch"
MAX_CHAIN = 3  # operations named between a conv and a BN that does not get its output


@dataclass(frozen=True)
class Pair:
    conv: str
    bn: str


@dataclass(frozen=True)
class Pairs:
    pairs: tuple[Pair, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (BN layer, why it is not a fold pair)
    note: str = ""  # torch.fx's part, when it could not trace the model


@dataclass(eq=False)
class _Output:
    """One call of a conv/linear: its output tensor and what took it."""

    conv: str
    version: int | None  # None: an inference tensor, which has no version counter
    signature: tuple | None
    uses: list[str] = field(default_factory=list)
    changed_by: list[str] = field(default_factory=list)  # in-place operations on it
    kept: Any = None  # the watcher's payload for the fold check, dropped when settled
    alive: int = 0  # tracked tensors (the output and its aliases) not yet freed


class Dataflow:
    """Observes one forward: `watching()` around it, then `pairs()`.

    `keep(conv, args)` makes a payload at each conv/linear call (the fold check keeps the
    input's first samples); `arrived(conv, bn, payload, bn_module, output)` runs after a BN call
    that received a conv output unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        keep: Callable[[nn.Module, tuple[Any, ...]], Any] | None = None,
        arrived: Callable[[str, str, Any, nn.Module, Any], None] | None = None,
    ) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.convs = {n: m for n, m in self.modules.items() if isinstance(m, FOLDABLE)}
        self.others = {n: m for n, m in self.modules.items() if isinstance(m, TRANSPOSED)}
        self._made: dict[int, tuple[weakref.ref, str]] = {}  # others' outputs, to name them
        self.bns = dict(find_bn_layers(model))
        # Read once, before the forward watched: what the BN layers hold while it runs.
        self.attrs = {
            n: LayerAttrs.of(m)
            for n, m in self.bns.items()
            if getattr(m, "running_mean", None) is not None
        }
        self.unfoldable = {n: why for n in self.bns if (why := _unfoldable(self.attrs.get(n)))}
        self.keep, self.arrived = keep, arrived
        self.fx_users, self.note = fx_users(model, self.modules)
        self._live: dict[int, tuple[weakref.ref, _Output]] = {}
        self._derived: dict[int, tuple[weakref.ref, str, tuple[str, ...]]] = {}
        self._calls: dict[str, list[_Output]] = {}
        self._arrivals: dict[str, list[_Output | str]] = {}
        self._pending: dict[str, _Output | None] = {}
        self._depth = 0  # inside a hooked module's call or our own hooks: ops are not uses
        self._open: dict[str, int] = {}  # calls entered and not yet left, per module
        self._mode: _Ops | None = None
        self._suspended = False

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        handles = []
        for name, m in self.convs.items():
            handles.append(m.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            handles.append(m.register_forward_hook(self._conv_done(name), always_call=True))
        for name, m in self.bns.items():
            handles.append(m.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            handles.append(m.register_forward_hook(self._bn_done(name), always_call=True))
        for name, m in self.others.items():
            handles.append(m.register_forward_hook(self._other_done(name)))
        handles.append(self.model.register_forward_hook(self._returned))
        self._calls.clear()
        self._arrivals.clear()
        self._mode = _Ops(self)
        _push_mode(self._mode)
        try:
            yield
        finally:
            if _current_mode() is self._mode:  # not when a failed call left it stepped aside
                _pop_mode()
            for h in handles:
                h.remove()
            for _, o in self._live.values():
                o.kept = None
            self._live.clear()
            self._derived.clear()
            self._made.clear()
            self._pending.clear()
            self._open.clear()
            self._depth, self._mode, self._suspended = 0, None, False

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._in(name)
            for t in _tensors((args, kwargs)):
                if (o := self._output_of(t, alias=True)) is not None:
                    o.uses.append(name)
            if name in self.bns:
                first = args[0] if args else kwargs.get("input")
                self._pending[name] = self._arrive(name, first)

        return hook

    def _arrive(self, bn: str, x: Any) -> _Output | None:
        o = self._output_of(x, alias=True) if isinstance(x, Tensor) else None
        if o is None:
            src = self._derived.get(id(x)) if isinstance(x, Tensor) else None
            if src is not None and src[0]() is x:
                why = f"its input is not the output of {src[1]} (an operation between them: "
                why += f"{', '.join(src[2])})"
            elif (made := self._made.get(id(x))) is not None and made[0]() is x:
                why = f"its input is the output of {made[1]}, which is not folded here"
            else:
                why = "its input is not the output of a Conv1d/2d/3d or Linear layer"
        elif o.version is None:
            why = (
                f"{o.conv}'s output has no version counter (an inference tensor): an in-place "
                "change between them cannot be ruled out"
            )
        elif _version(x) != o.version:
            by = f" by {', '.join(dict.fromkeys(o.changed_by))}" if o.changed_by else ""
            why = (
                f"its input is not the output of {o.conv} (an operation between them: the "
                f"tensor changed in place{by})"
            )
        else:
            self._arrivals.setdefault(bn, []).append(o)
            return o
        self._arrivals.setdefault(bn, []).append(why)
        return None

    def _other_done(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, Tensor):
                gone = functools.partial(self._forget, self._made, id(out))
                self._made[id(out)] = (weakref.ref(out, gone), f"{name} ({type(module).__name__})")

        return hook

    def _conv_done(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            try:
                if isinstance(out, Tensor):
                    o = _Output(name, _version(out), _signature(out))
                    if self.keep is not None:
                        o.kept = self.keep(module, args)
                    self._calls.setdefault(name, []).append(o)
                    self._track(out, o)
            finally:
                self._out(name)

        return hook

    def _bn_done(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            try:
                o = self._pending.pop(name, None)
                foldable = name not in self.unfoldable and self.arrived is not None
                if o is not None and out is not None and foldable:
                    self.arrived(o.conv, name, o.kept, module, out)
            finally:
                self._out(name)

        return hook

    def _in(self, name: str) -> None:
        self._open[name] = self._open.get(name, 0) + 1
        self._depth += 1
        # Inside a conv or BN call nothing is a use: the mode steps aside, so that the module's
        # own ops and the audit's measurement in its hooks do not pay for it.
        if self._depth == 1 and self._mode is not None and _current_mode() is self._mode:
            _pop_mode()
            self._suspended = True

    def _out(self, name: str) -> None:
        if not self._open.get(name):  # an earlier pre-hook raised: this call never came in
            return
        self._open[name] -= 1
        self._depth -= 1
        if self._depth == 0 and self._suspended:
            _push_mode(self._mode)
            self._suspended = False

    def _returned(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        for t in _tensors(out):
            if (o := self._output_of(t, alias=True)) is not None:
                o.uses.append("the model's output")

    def op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one torch operation, noting which conv outputs it takes and what it returns."""
        inputs = _tensors((args, kwargs))
        hits = [(t, o, _version(t)) for t in inputs if (o := self._output_of(t)) is not None]
        result = func(*args, **kwargs)
        name = _op_name(func)
        outs = _tensors(result)
        for t, o, before in hits:
            if _version(t) != before:
                o.changed_by.append(name)
            aliases = [
                r
                for r in outs
                if o.version is not None
                and _version(r) == o.version
                and _signature(r) == o.signature
            ]
            for r in aliases:
                self._track(r, o)
            if not aliases:
                o.uses.append(name)
                o.kept = None  # another use: no pair, no fold check
        source = next(((o.conv, ()) for _, o, _ in hits), None)
        if source is None:
            for t in inputs:
                entry = self._derived.get(id(t))
                if entry is not None and entry[0]() is t:
                    source = entry[1:]
                    break
        if source is not None:
            chain = (*source[1], name)[:MAX_CHAIN]
            for r in outs:
                if self._output_of(r) is None:
                    key = id(r)
                    gone = functools.partial(self._forget, self._derived, key)
                    self._derived[key] = (weakref.ref(r, gone), source[0], chain)
        return result

    def _track(self, t: Tensor, o: _Output) -> None:
        key = id(t)
        if self._live.get(key, (None, None))[1] is o:
            return
        o.alive += 1
        self._live[key] = (weakref.ref(t, functools.partial(self._freed, key, o)), o)

    def _freed(self, key: int, o: _Output, ref: weakref.ref) -> None:
        self._forget(self._live, key, ref)
        o.alive -= 1
        if o.alive <= 0:
            o.kept = None

    @staticmethod
    def _forget(table: dict, key: int, ref: weakref.ref) -> None:
        if key in table and table[key][0] is ref:
            del table[key]

    def _output_of(self, t: Any, alias: bool = False) -> _Output | None:
        """The conv call whose output `t` is; with `alias`, also by storage, shape and strides."""
        if not isinstance(t, Tensor):
            return None
        entry = self._live.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        if alias and self._live:
            sig = _signature(t)
            for ref, o in self._live.values():
                if sig is not None and o.signature == sig and ref() is not None:
                    return o
        return None

    # --- the verdict ---------------------------------------------------------------------------

    def pairs(self) -> Pairs:
        found, skipped = [], []
        for bn in self.bns:
            conv, why = self._judge(bn)
            if why:
                skipped.append((bn, why))
            else:
                found.append(Pair(conv, bn))
        return Pairs(tuple(found), tuple(skipped), self.note)

    def _judge(self, bn: str) -> tuple[str, str]:
        """(the conv, "") for a pair, else ("", why not)."""
        m = self.bns[bn]
        if bn in self.unfoldable:
            return "", self.unfoldable[bn]
        arrivals = self._arrivals.get(bn, [])
        if not arrivals:
            return "", "did not run on the first batch"
        reasons = [x for x in arrivals if isinstance(x, str)]
        if reasons:
            return "", reasons[0]
        convs = list(dict.fromkeys(o.conv for o in arrivals if isinstance(o, _Output)))
        if len(convs) > 1:
            return "", f"its calls receive the outputs of {' and '.join(convs)}"
        conv = convs[0]
        for o in self._calls[conv]:
            others = [u for u in o.uses if u != bn]
            if others:
                also = ", ".join(dict.fromkeys(others))
                return "", f"{conv}'s output is also used by {also}: folding would change it"
            if len(o.uses) != 1:
                return "", f"not every output of {conv} on the first batch goes to {bn} once"
        users = (self.fx_users or {}).get(conv, [])
        if len(users) > 1:
            return "", f"torch.fx: {conv}'s output has {len(users)} users ({', '.join(users)})"
        c = self.convs[conv]
        out = c.out_features if isinstance(c, nn.Linear) else c.out_channels
        if out != m.running_mean.numel():
            return "", f"{conv} has {out} output channels, {bn} {m.running_mean.numel()}"
        return conv, ""


def _unfoldable(a: LayerAttrs | None) -> str:
    """Why this BN layer (its attributes, None without running stats) cannot be folded
    whatever feeds it; "" when it can."""
    if a is None:
        return "no running statistics to fold (track_running_stats=False)"
    if a.kind is LayerKind.INSTANCE:
        return f"a {a.type_name} normalises each sample with its own statistics"
    if a.overrides_forward:
        # An activation or dropout after the normalisation is not part of a fold.
        return f"a {a.type_name} does more than BN in its forward"
    return ""


class _Ops(TorchFunctionMode):
    def __init__(self, flow: Dataflow) -> None:
        super().__init__()
        self.flow = flow

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flow = self.flow
        if flow._depth or not (flow._live or flow._derived) or _op_name(func) in METADATA:
            return func(*args, **kwargs)
        return flow.op(func, args, kwargs)


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", "") or type(func).__name__
    if name == "__get__":  # a Tensor property: .shape, .data, .T
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        name = name[2:-2]
    return name


def _version(t: Any) -> int | None:
    try:
        return t._version
    except (AttributeError, RuntimeError):  # inference tensors have no version counter
        return None


def _signature(t: Tensor) -> tuple | None:
    """What two tensors share when one is the other seen again: memory, dtype, shape, strides."""
    try:
        if t.layout is not torch.strided or t.is_meta:
            return None
        return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride())
    except (RuntimeError, NotImplementedError):
        return None
