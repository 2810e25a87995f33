"""`bnaudit fold`: conv/linear → BN pairs folded into one layer, checked against the model."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["command"],
    submod_attrs={
        "command": ["run_fold"],
    },
)
