"""`bnaudit show`: one BN layer explained, its attributes, formulas and runnable code."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["view"],
    submod_attrs={
        "view": ["render_layer", "find_layer"],
    },
)
