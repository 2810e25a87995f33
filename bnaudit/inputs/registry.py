"""Building the --model: registry names (`timm:NAME`, `torchvision:NAME`), factory specs, and
the factory's arguments (`--model-arg NAME=VALUE`).

timm and torchvision are optional imports. Registry models are built with random weights
(timm `pretrained=False`, torchvision `weights=None`): the checkpoint supplies the weights, and
bnaudit never downloads anything.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from bnaudit.core.errors import BnauditError, ModelError, describe
from bnaudit.inputs.specs import import_object

REGISTRIES = ("timm", "torchvision")
# Arguments that would make a registry download weights; the checkpoint supplies them.
_DOWNLOADS = {"timm": ("pretrained", "pretrained_cfg_overlay"), "torchvision": ("weights",)}


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """`NAME=VALUE` strings → keyword arguments. VALUE is a Python literal (10, 0.5, True, None,
    'relu', (1, 2)); one that is not a literal is taken as a string (act_layer=relu)."""
    kwargs: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ModelError(
                f"--model-arg {item!r}: expected NAME=VALUE, e.g. --model-arg num_classes=10"
            )
        if name in kwargs:
            raise ModelError(f"--model-arg {name} is given twice; give each argument once")
        try:
            kwargs[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            kwargs[name] = text.strip()
    return kwargs


def registry_of(spec: str) -> tuple[str, str] | None:
    """('timm', 'resnet50') for 'timm:resnet50'; None for a file or module spec."""
    head, sep, name = spec.partition(":")
    if sep and head in REGISTRIES:
        return head, name
    return None


def build_model(spec: str, args: Sequence[str] = ()) -> nn.Module:
    """The model of `--model spec`, called with the `--model-arg` arguments."""
    kwargs = parse_model_args(args)
    registry = registry_of(spec)
    if registry is not None:
        factory = _registry_factory(*registry, kwargs)
    else:
        factory = _user_factory(spec)
        _check_arguments(spec, factory, kwargs)
    try:
        model = factory(**kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"--model {spec}: the factory raised {describe(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"--model {spec}: the factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _user_factory(spec: str) -> Callable[..., Any]:
    try:
        factory = import_object(spec, what="--model")
    except BnauditError as exc:
        raise ModelError(str(exc) + _registry_hint(spec)) from exc
    if not callable(factory):
        raise ModelError(f"--model {spec}: {type(factory).__name__} object is not callable")
    return factory


def _registry_hint(spec: str) -> str:
    """'; for a timm model pass --model timm:resnet18' where the spec looks like one."""
    head, sep, name = spec.rpartition(":")
    if not sep:  # timm.resnet18, resnet18
        head, _, name = spec.rpartition(".")
    top = head.partition(".")[0]
    if not name.isidentifier():
        return ""
    if top in REGISTRIES:
        return f"; for a {top} model pass --model {top}:{name}"
    if not head:
        return f"; for a registry model pass --model timm:{name} or --model torchvision:{name}"
    return ""


def _check_arguments(spec: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """A factory that needs arguments gets a message that shows how to pass them."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C factory: let the call tell
        return
    try:
        signature.bind(**kwargs)
    except TypeError:
        params = signature.parameters
        unknown = [k for k in kwargs if k not in params]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        missing = [
            n
            for n, p in params.items()
            if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and n not in kwargs
        ]
        if unknown and not takes_any:
            accepted = ", ".join(params) or "no arguments"
            raise ModelError(
                f"--model {spec}: the factory takes no argument {', '.join(unknown)} "
                f"(it takes: {accepted})"
            ) from None
        if missing:
            how = " ".join(f"--model-arg {n}=VALUE" for n in missing)
            raise ModelError(
                f"--model {spec}: the factory needs {', '.join(missing)}: pass {how} "
                "(VALUE a Python literal: 10, 0.5, True, 'name')"
            ) from None
        raise ModelError(
            f"--model {spec}: the factory cannot be called with {kwargs} by keyword: "
            f"its signature is {signature}; wrap it in a function without arguments"
        ) from None


def import_registry(registry: str, spec: str) -> Any:
    """Import timm or torchvision.models, with a message that says what to do when it fails."""
    module_name = "torchvision.models" if registry == "torchvision" else registry
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        if getattr(exc, "name", None) in (registry, module_name):
            raise ModelError(
                f"--model {spec} needs {registry}, which is not installed: "
                f"pip install {registry} (into this environment, beside torch)"
            ) from exc
        raise ModelError(f"--model {spec}: importing {registry} failed: {describe(exc)}") from exc
    except Exception as exc:
        text = str(exc)
        if "torchvision::" in text or ("torchvision" in text and "operator" in text):
            raise ModelError(
                f"--model {spec}: importing {registry} failed because torchvision's compiled ops "
                f"do not load ({describe(exc)}): the installed torchvision was built for another "
                "torch. Install the torchvision release made for this torch, or uninstall "
                "torchvision" + (" (timm needs it)" if registry == "timm" else "")
            ) from exc
        raise ModelError(f"--model {spec}: importing {registry} failed: {describe(exc)}") from exc


def _registry_factory(registry: str, name: str, kwargs: dict[str, Any]) -> Callable[..., Any]:
    spec = f"{registry}:{name}"
    if not name:
        raise ModelError(f"--model {spec}: name the model, e.g. --model {registry}:resnet50")
    downloads = [k for k in kwargs if k in _DOWNLOADS[registry]]
    if downloads:
        raise ModelError(
            f"--model-arg {downloads[0]}: bnaudit builds {registry} models without pretrained "
            "weights and never downloads: the checkpoint supplies the weights; drop the argument"
        )
    module = import_registry(registry, spec)
    if registry == "timm":
        if not module.is_model(name):
            near = _nearest(name, list(module.list_models()))
            raise ModelError(f"--model {spec}: timm has no model {name!r}{near}")
        return lambda **kw: module.create_model(name, pretrained=False, **kw)
    if hasattr(module, "list_models"):  # torchvision >= 0.14
        known = list(module.list_models())
        builder = module.get_model_builder(name) if name in known else None
    else:
        known = [n for n in dir(module) if n.islower() and not n.startswith("_")]
        builder = getattr(module, name, None) if name in known else None
    if not callable(builder):
        raise ModelError(
            f"--model {spec}: torchvision has no model {name!r}{_nearest(name, known)}"
        )
    return lambda **kw: builder(weights=None, **kw)


def _nearest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def timm_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's preprocessing for a model it built (input_size, interpolation, crop_pct, mean,
    std), as `timm.data.resolve_data_config` resolves it."""
    data = importlib.import_module("timm.data")
    return dict(data.resolve_data_config({}, model=model))
