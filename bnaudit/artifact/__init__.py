"""`check ARTIFACT --against CKPT`: a deployed model run and judged against its checkpoint."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["artifacts", "command", "outputs", "places"],
    submod_attrs={
        "command": ["run_artifact_check"],
        "artifacts": ["Artifact", "open_artifact"],
    },
)
