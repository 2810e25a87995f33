"""`bnaudit recalibrate`: precise running statistics from sample data, and the new checkpoint."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["command", "recalibration", "saving"],
    submod_attrs={
        "recalibration": ["Recalibration", "recalibrate", "apply", "updated_state_dict"],
        "command": ["run_recalibrate"],
    },
)
