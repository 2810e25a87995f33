"""The layer rules: one small function per finding code, registered in one table."""

from bnaudit.verdict.rules.context import LayerContext
from bnaudit.verdict.rules.table import RULES, Rule

__all__ = ["RULES", "LayerContext", "Rule"]
