"""The `bnaudit` command line: options parsed, the library called, errors mapped to exit codes."""

from bnaudit.cli.application import app, main

__all__ = ["app", "main"]
