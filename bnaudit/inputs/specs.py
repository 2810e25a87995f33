"""Importing user code named by a spec: `path/to/file.py:name` or `package.module:name`."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from bnaudit.core.errors import BnauditError, describe


def import_object(spec: str, *, what: str) -> Any:
    """The object `name` from the module of `spec`; `what` names the option in messages."""
    module_part, sep, name = spec.rpartition(":")
    if not sep or not module_part or not name.isidentifier():
        raise BnauditError(f"{what} {spec!r}: expected path/to/file.py:name or package.module:name")
    module = _import_module(module_part, spec, what)
    try:
        return getattr(module, name)
    except AttributeError:
        raise BnauditError(f"{what} {spec}: {module_part} has no attribute {name!r}") from None


def _import_module(module_part: str, spec: str, what: str) -> Any:
    path = Path(module_part)
    is_file = module_part.endswith(".py") or path.is_file()
    # Console scripts do not put the working directory on sys.path; users expect it there.
    extra = [str(path.resolve().parent)] if is_file else [str(Path.cwd())]
    added = [p for p in extra if p not in sys.path]
    sys.path[:0] = added
    try:
        if is_file:
            if not path.is_file():
                raise BnauditError(f"{what} {spec}: no such file {module_part}")
            # A stable, unique name so two files called models.py do not collide.
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            mod_spec = importlib.util.spec_from_file_location(f"_bnaudit_user_{digest}", path)
            if mod_spec is None or mod_spec.loader is None:
                raise BnauditError(f"{what} {spec}: cannot import {module_part}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_part)
    except BnauditError:
        raise
    except Exception as exc:
        raise BnauditError(
            f"{what} {spec}: importing {module_part} failed: {describe(exc)}"
        ) from exc
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
