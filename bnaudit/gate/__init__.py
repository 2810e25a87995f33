"""What the user accepts and what fails: settings, baselines, ignores, the exit decision."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["baseline", "config", "decision", "ignores"],
    submod_attrs={
        "config": ["CheckSettings", "resolve"],
        "baseline": ["Baseline", "apply_baseline", "from_report", "read_baseline"],
        "ignores": ["Ignore", "apply_ignores"],
        "decision": ["judge"],
    },
)
