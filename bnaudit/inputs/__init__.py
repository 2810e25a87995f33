"""The user"s model and data: registry names, factory specs, batches, image folders, autocast."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["batches", "calls", "containers", "images", "precision", "registry", "specs"],
    submod_attrs={
        "registry": ["build_model", "parse_model_args"],
        "batches": ["load_batches", "synthetic_batches"],
        "calls": ["Call", "call_model", "to_call"],
        "images": ["ImageFolder", "find_images"],
        "precision": ["Autocast", "autocast_forward"],
        "specs": ["import_object"],
    },
)
