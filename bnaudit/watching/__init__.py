"""Watching BN layers while a model trains: hooks per optimizer step, findings with step numbers."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["forwards", "ledger", "probes", "render", "report", "results", "steps", "watcher"],
    submod_attrs={
        "watcher": ["watch", "Watcher", "BadTrainingStep"],
        "report": ["WatchReport"],
        "results": ["WatchLayer", "WatchMetrics", "WatchRecord"],
    },
)
