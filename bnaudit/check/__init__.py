"""`bnaudit check` and the audit behind it: `audit()` with a model, `audit_state_dict()` without."""

import lazy_loader

# Imported on first use: the command line reaches a stage without paying for the ones it skips.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submodules=["audit", "run", "static"],
    submod_attrs={
        "audit": ["AuditOptions", "audit"],
        "static": ["audit_state_dict"],
        "run": ["run_check", "write_reports"],
    },
)
