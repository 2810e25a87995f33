"""bnaudit inside other tools: training callbacks and watchers, and a pytest assertion."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["callbacks", "testing", "watching"],
    submod_attrs={
        "callbacks": ["audit_after_epoch", "layer_metrics"],
        "testing": ["assert_bn_healthy"],
        "watching": ["BNWatchCallback", "BNWatchTrainerCallback", "torch_optimizer"],
    },
)
