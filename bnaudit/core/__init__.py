"""The core every stage stands on: typed errors, limits, BN formulas, BN layers, untrusted text."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        "blocked",
        "errors",
        "formulas",
        "keys",
        "layers",
        "limits",
        "paths",
        "sorting",
        "untrusted",
        "version",
    ],
    submod_attrs={
        "errors": [
            "BnauditError",
            "CheckpointError",
            "ModelError",
            "DataError",
            "ReportError",
            "ConfigError",
            "BaselineError",
            "NothingToAudit",
            "describe",
        ],
        "layers": [
            "LayerKind",
            "KnownAttrs",
            "LayerAttrs",
            "find_bn_layers",
            "layer_kind",
            "preserved",
            "act_tap",
        ],
        "sorting": ["natural_key"],
        "version": ["__version__"],
    },
)
