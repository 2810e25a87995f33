"""Deprecated: moved to `bnaudit.integrations.testing` (this path goes in bnaudit 0.3)."""

from bnaudit.core.moved import alias

__getattr__ = alias(__name__, "bnaudit.integrations.testing")
