"""The version of bnaudit, written into every report (kept equal to pyproject.toml's)."""

__version__ = "0.1.0"
