"""From measurements to findings: the metrics of a layer, the rules and codes, significance."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        "codes",
        "drift",
        "figures",
        "findings",
        "metrics",
        "results",
        "rules",
        "significance",
        "thresholds",
    ],
    submod_attrs={
        "results": ["Severity", "FailOn", "Status", "Finding", "LayerMetrics", "LayerResult"],
        "thresholds": ["Thresholds"],
        "findings": ["judge_layer", "judge_model"],
        "codes": ["CODES", "DIFF_CODES", "hint"],
        "figures": ["figures_of"],
        "metrics": ["measure"],
    },
)
