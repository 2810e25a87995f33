"""`bnaudit diff`: what changed in the BatchNorm state between two checkpoints."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["changes", "command", "render", "results"],
    submod_attrs={
        "changes": ["diff"],
        "results": ["DiffReport", "LayerDiff"],
        "command": ["run_diff"],
    },
)
