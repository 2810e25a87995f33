"""The audit"s forward passes and what they record: probes, exact kernels, streaming statistics."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=[
        "dataflow",
        "evidence",
        "explain",
        "fold",
        "fused",
        "fused_kernels",
        "fx_graph",
        "grouped",
        "impact",
        "passes",
        "probe",
        "progress",
        "rows",
        "statistics",
        "updates",
        "upstream",
    ],
    submod_attrs={
        "passes": ["Passes", "run_passes", "recalibrated_stats"],
        "probe": ["Probe"],
        "statistics": ["LayerStats", "Moments"],
        "impact": ["OutputImpact", "OutputDiff", "Evidence", "precise_stats"],
        "fold": ["FoldWatch", "check_folds", "fold_model"],
        "dataflow": ["Dataflow", "Pairs"],
        "upstream": ["Upstream"],
        "progress": ["ProgressFn"],
    },
)
