"""Auditing during training: a function to call after an epoch, and a Lightning callback.

    for epoch in range(epochs):
        train_one_epoch(model, loader)
        audit_after_epoch(model, val_loader, log=lambda m: writer.add_scalars("bn", m, epoch))

`BNAuditCallback` (PyTorch Lightning, imported only when asked for) does the same at the end
of every training epoch and logs with `LightningModule.log_dict`. Both audit a few batches
(`max_batches`, default 4) and leave the model as they found it (modes, buffers).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from bnaudit.check.audit import audit
from bnaudit.report.audit_report import AuditReport

DEFAULT_BATCHES = 4
# The per-layer numbers logged (`LayerMetrics.flat()` names): how far the running
# stats are from the data, and how well the layer reproduces its formulas.
LOGGED = (
    "stale_shift_max",
    "stale_log_var_max",
    "gap_shift_max",
    "gap_log_var_max",
    "recon_train_ratio",
    "recon_eval_ratio",
)


def layer_metrics(report: AuditReport, prefix: str = "bn/") -> dict[str, float]:
    """The report as flat, loggable numbers: `{prefix}{layer}/{metric}` for every layer and
    `LOGGED` metric, each layer's severity (0 ok … 3 fail), and `{prefix}failing` (findings
    that fail the gate). NaN (not measured) is left out: loggers reject or plot it badly."""
    out: dict[str, float] = {}
    for layer in report.layers:
        flat = layer.metrics.flat()
        for name in LOGGED:
            value = float(flat[name])
            if math.isfinite(value):
                out[f"{prefix}{layer.name}/{name}"] = value
        out[f"{prefix}{layer.name}/severity"] = float(layer.severity)
    out[f"{prefix}failing"] = float(len(report.failing))
    return out


def audit_after_epoch(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int = DEFAULT_BATCHES,
    log: Callable[[dict[str, float]], Any] | None = None,
    prefix: str = "bn/",
    **options: Any,
) -> AuditReport:
    """Audit `model` on the first `max_batches` of `batches` and log the per-layer metrics.

    Args:
        model: the model being trained; its modes and BN buffers are restored afterwards.
        batches: validation batches (a DataLoader, a list), as for `bnaudit.audit`.
        log: called once with `layer_metrics(report, prefix)`: `wandb.log`,
            `mlflow.log_metrics`, a TensorBoard writer's `add_scalars` wrapped in a lambda.
        **options: `AuditOptions` and `Thresholds` fields; the output-impact passes are off
            unless `impact=True` (they cost a pass per batch and layer group).

    Returns:
        The report: `report.passed`, `report.failing`, `report.summary()`.
    """
    if max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    options.setdefault("impact", False)
    # A list, so that a shuffling loader gives the same batches to every pass.
    sample = list(itertools.islice(batches, max_batches))
    report = audit(model, sample, **options)
    if log is not None:
        log(layer_metrics(report, prefix))
    return report


def _lightning_callback_base() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError(
                "bnaudit.integrations.callbacks.BNAuditCallback needs PyTorch Lightning: pip "
                "install lightning; without it, call bnaudit.audit_after_epoch(model, batches) "
                "after each epoch"
            ) from None
    return Callback


def _make_callback_class() -> type:
    base = _lightning_callback_base()

    class BNAuditCallback(base):  # type: ignore[misc, valid-type]
        """Audit the LightningModule's BN layers at the end of every `every_n_epochs`-th
        training epoch (after its validation), on `max_batches` validation batches (training
        batches when there is no validation loader), and log the metrics with `log_dict`.
        The last report is kept in `self.report`."""

        def __init__(
            self,
            max_batches: int = DEFAULT_BATCHES,
            every_n_epochs: int = 1,
            prefix: str = "bn/",
            **options: Any,
        ) -> None:
            super().__init__()
            if every_n_epochs < 1:
                raise ValueError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
            self.max_batches, self.every_n_epochs, self.prefix = max_batches, every_n_epochs, prefix
            self.options = options
            self.report: AuditReport | None = None

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if getattr(trainer, "sanity_checking", False):
                return
            if (trainer.current_epoch + 1) % self.every_n_epochs:
                return
            loader = _first_loader(getattr(trainer, "val_dataloaders", None))
            if loader is None:
                loader = _first_loader(getattr(trainer, "train_dataloader", None))
            if loader is None:
                warnings.warn(
                    "BNAuditCallback: the trainer has no validation or training loader to "
                    "audit on; skipped",
                    stacklevel=2,
                )
                return
            self.report = audit_after_epoch(
                pl_module,
                loader,
                max_batches=self.max_batches,
                log=pl_module.log_dict,
                prefix=self.prefix,
                **self.options,
            )

    return BNAuditCallback


def _first_loader(loaders: Any) -> Iterable[Any] | None:
    """Lightning gives one loader, or a list or dict of them: the first."""
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    elif isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders


def __getattr__(name: str) -> Any:
    # Built on first use, so that importing bnaudit.integrations.callbacks does not need Lightning.
    if name == "BNAuditCallback":
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'bnaudit.integrations.callbacks' has no attribute {name!r}")
