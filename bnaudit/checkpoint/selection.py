"""Which state dict of a checkpoint to audit: the default search, `--key`, wrapper prefixes.

Training checkpoints nest the weights (`state_dict`, `model`, Lightning's `state_dict` with
`model.` keys, timm's `state_dict` next to `state_dict_ema`); bare state dicts carry wrapper
prefixes (DDP, torch.compile) and wrappers' own keys (AveragedModel's `n_averaged`). The
choice is explicit and reported, never a guess left unsaid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bnaudit.core.errors import CheckpointError
from bnaudit.core.untrusted import SHOWN, plain, quote, short_repr

# Where training scripts put the weights in a checkpoint dict, in the order tried; nested dicts
# are searched the same way (at most three levels). EMA weights are the default only when there
# are no others: `--key` picks them.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict")
_DEPTH = 3
# Wrapper prefixes, and what puts each in front of the model's own keys. DDP and DataParallel
# hold the model as `module`; so do timm's ModelEmaV2/V3 (`self.module = deepcopy(model)`, no
# state of their own), which the keys cannot tell apart from DDP.
WRAPPERS = {
    "module.": "DDP/DataParallel or timm ModelEmaV2/V3",
    "model.": "Lightning module",
    "_orig_mod.": "torch.compile",
}
# torch.optim.swa_utils.AveragedModel: the model as `module` and a buffer counting the models
# averaged. Its BN statistics are not those of the averaged weights: why update_bn exists.
AVERAGED_MODEL = "torch.optim.swa_utils.AveragedModel"
N_AVERAGED = "n_averaged"


@dataclass(frozen=True)
class Selection:
    """Where the audited state dict sits in the loaded object: dict keys, then a key prefix."""

    path: tuple[str, ...] = ()
    prefix: str = ""
    others: tuple[str, ...] = ()  # other top-level keys that hold state dicts

    def apply(self, obj: Any) -> Any:
        for part in self.path:
            obj = obj[part]
        if self.prefix:
            return {k[len(self.prefix) :]: v for k, v in obj.items() if k.startswith(self.prefix)}
        return obj

    @property
    def source(self) -> str:
        where = "key " + " → ".join(map(quote, self.path)) if self.path else "top level"
        return where + (f", keys under {quote(self.prefix)}" if self.prefix else "")


def select(obj: Any, key: str | None, path: Path, *, trust: bool) -> Selection:
    """Where the state dict (or, with `trust`, the module) to audit is in `obj`.

    `key`: a dict key, nested with dots, or a key prefix inside a flat state dict; None: the
    first of STATE_DICT_KEYS, then EMA_KEYS, searched through nested dicts.
    """
    if isinstance(obj, nn.Module) and key is None:
        return Selection()
    if key is not None:
        return _select_key(obj, key, path, trust)
    found = _find(obj, 0, trust)
    if found is None:
        raise CheckpointError(_no_state_dict(obj, path))
    others = ()
    if found and isinstance(obj, dict):
        others = tuple(
            k for k, v in obj.items() if k != found[0] and _find(v, 1, trust) is not None
        )
    return Selection(found, others=others)


def _find(obj: Any, depth: int, trust: bool) -> tuple[str, ...] | None:
    if is_state_dict(obj) or (trust and isinstance(obj, nn.Module)):
        return ()
    if not isinstance(obj, dict) or depth >= _DEPTH:
        return None
    for k in (*STATE_DICT_KEYS, *EMA_KEYS):
        if k in obj:
            sub = _find(obj[k], depth + 1, trust)
            if sub is not None:
                return (k, *sub)
    return None


def _select_key(obj: Any, key: str, path: Path, trust: bool) -> Selection:
    parts = [key] if isinstance(obj, dict) and key in obj else key.split(".")
    cur = obj
    for i, part in enumerate(parts):
        if is_state_dict(cur):  # the rest is a key prefix inside a flat state dict
            prefix = ".".join(parts[i:]) + "."
            if any(k.startswith(prefix) for k in cur):
                return Selection(tuple(parts[:i]), prefix)
            raise CheckpointError(
                f"{path}: --key {plain(key)}: no key starts with {quote(prefix)} in the state "
                f"dict at {Selection(tuple(parts[:i])).source}; its keys start with "
                f"{listing(sorted({k.split('.')[0] for k in cur}))}"
            )
        if not isinstance(cur, dict) or part not in cur:
            held = listing(cur) if isinstance(cur, dict) else type(cur).__name__
            raise CheckpointError(
                f"{path}: --key {plain(key)}: there is no {quote(part)} here; the checkpoint "
                f"holds {held}"
            )
        cur = cur[part]
    if is_state_dict(cur) or (trust and isinstance(cur, nn.Module)):
        return Selection(tuple(parts))
    raise CheckpointError(
        f"{path}: --key {plain(key)} holds a {type(cur).__name__}, not a state dict"
        + (f" (keys {listing(cur)})" if isinstance(cur, dict) else "")
    )


def is_state_dict(d: Any) -> bool:
    """A non-empty str → Tensor dict (`*_extra_state` entries may hold anything)."""
    return (
        isinstance(d, dict)
        and bool(d)
        and all(
            isinstance(k, str) and (isinstance(v, Tensor) or k.endswith("_extra_state"))
            for k, v in d.items()
        )
        and any(isinstance(v, Tensor) for v in d.values())
    )


def _no_state_dict(obj: Any, path: Path) -> str:
    keys = f" with keys {listing(obj, quoted=True)}" if isinstance(obj, dict) else ""
    wanted = ", ".join((*STATE_DICT_KEYS, *EMA_KEYS))
    return (
        f"{path}: no state dict found: the file holds a {type(obj).__name__}{keys}; expected a "
        f"state dict, or a dict holding one under {wanted}; name another with --key"
    )


@dataclass(frozen=True)
class Wrapping:
    """The wrappers around the model in a state dict's keys, outermost first."""

    prefix: str = ""  # in front of every key of the model's own
    wrappers: tuple[str, ...] = ()  # what put each part of the prefix there
    set_aside: tuple[str, ...] = ()  # the wrappers' own keys (AveragedModel's n_averaged)

    def outer(self, prefix: str) -> Wrapping:
        """The outer wrappers alone, those whose prefixes make up `prefix` (a start of
        `self.prefix` ending in a dot): what stripping only `prefix` takes away."""
        return Wrapping(
            prefix,
            self.wrappers[: prefix.count(".")],
            tuple(k for k in self.set_aside if not k.startswith(prefix)),
        )

    def notes(self, state_dict: Mapping[str, Any]) -> list[str]:
        """The report's notes: the prefix left out of the layer names and who put it there, and
        each AveragedModel's n_averaged, read from `state_dict` (verify those keys first)."""
        notes = []
        if self.prefix:
            parts = [p + "." for p in self.prefix.removesuffix(".").split(".")]
            what = "; ".join(f"{p}: {w}" for p, w in zip(parts, self.wrappers, strict=True))
            notes.append(f"wrapper prefix {self.prefix!r} left out of the layer names ({what})")
        for key in self.set_aside:
            notes.append(
                f"{AVERAGED_MODEL} checkpoint ({N_AVERAGED} = {_number(state_dict[key])}): SWA "
                "averages the weights, not the BN statistics, which stay those of the model "
                "copied (or their average, with use_buffers=True); unless update_bn ran after "
                "the last update_parameters, run torch.optim.swa_utils.update_bn or bnaudit "
                "recalibrate"
            )
        return notes


def unwrap(keys: Iterable[str]) -> Wrapping:
    """The wrappers every key shares (`module.`, `model.module.`, AveragedModel, ...), peeled in
    turn from the outside in. Only a prefix that every key has is a wrapper's."""
    keys = list(keys)
    prefix, wrappers, aside = "", [], []
    while keys:
        rest = [k for k in keys if k != N_AVERAGED]
        if len(rest) == len(keys) - 1 and rest and all(k.startswith("module.") for k in rest):
            aside.append(prefix + N_AVERAGED)
            shared, what, keys = "module.", AVERAGED_MODEL, rest
        else:
            shared = next((w for w in WRAPPERS if all(k.startswith(w) for k in keys)), None)
            if shared is None:
                break
            what = WRAPPERS[shared]
        prefix += shared
        wrappers.append(what)
        keys = [k[len(shared) :] for k in keys]
    return Wrapping(prefix, tuple(wrappers), tuple(aside))


def _number(t: Tensor) -> str:
    if t.numel() != 1:
        return f"a tensor of shape {tuple(t.shape)}"
    value = t.reshape(()).item()
    return f"{value:g}" if isinstance(value, float) else str(value)


def listing(items: Iterable[Any], *, quoted: bool = False) -> str:
    """The first few of `items` (names from a file: escaped, cut, repr bounded), then how many
    more; only those shown are ever turned into text."""
    items = list(items)
    name = quote if quoted else plain
    shown = [name(i) if isinstance(i, str) else short_repr(i) for i in items[:SHOWN]]
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(shown) + more
