"""Checkpoint files read safely: format, zip integrity, pickle scan, selection, one `Checkpoint`."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        "bn_groups",
        "digest",
        "formats",
        "into_model",
        "loading",
        "pages",
        "pickles",
        "programs",
        "refusals",
        "selection",
        "zipcheck",
    ],
    submod_attrs={
        "loading": ["Checkpoint", "load_checkpoint"],
        "into_model": ["load_into"],
        "formats": ["FileKind", "detect"],
        "selection": ["Selection", "select", "unwrap"],
        "bn_groups": ["BnGroup", "find_bn_groups"],
        "digest": ["sha256_file", "prefetch"],
    },
)
