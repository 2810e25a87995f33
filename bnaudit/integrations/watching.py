"""The training watcher (`bnaudit.watch`) inside training frameworks.

    trainer = lightning.Trainer(callbacks=[BNWatchCallback()])            # PyTorch Lightning
    trainer = transformers.Trainer(..., callbacks=[BNWatchTrainerCallback()])  # Hugging Face

Each starts a watcher when training starts (on the model the framework trains and the torch
optimizer inside its wrappers), closes it when training ends or fails, and keeps its report in
`callback.report`. The classes are built on first use, so importing this module needs neither
framework; `strict=True` raises `BadTrainingStep` out of the framework's training loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bnaudit.watching.report import WatchReport
from bnaudit.watching.watcher import Watcher, watch


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer), whose `step` is the one that runs the step hooks."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8:  # a wrapper holds the real one
        inner = optimizer.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"bnaudit: cannot watch {type(optimizer).__name__}: it holds no torch.optim.Optimizer"
        )
    return optimizer


class _Watching:
    """What both callbacks do: a watcher from start to end of training, its report kept."""

    def __init__(
        self,
        accumulate: int | None = None,
        every: int = 1,
        strict: bool = False,
        fail_on: str = "warn",
    ) -> None:
        self.options = {"accumulate": accumulate, "every": every, "strict": strict}
        self.fail_on = fail_on
        self.watcher: Watcher | None = None
        self.report: WatchReport | None = None

    def start(self, model: nn.Module, optimizer: Any) -> None:
        self.stop()
        self.watcher = watch(
            model, torch_optimizer(optimizer), **self.options, fail_on=self.fail_on
        )

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.report = self.watcher.report()
            self.watcher = None


def _lightning_base() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError(
                "bnaudit.integrations.watching.BNWatchCallback needs PyTorch Lightning: pip "
                "install lightning; in a plain loop, use bnaudit.watch(model, optimizer)"
            ) from None
    return Callback


def _make_lightning() -> type:
    class BNWatchCallback(_Watching, _lightning_base()):  # type: ignore[misc]
        """Watch every BN layer of the LightningModule at each optimizer step of `fit`; the
        report is in `self.report` once training ends. Watches the first optimizer."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _Watching.__init__(self, *args, **kwargs)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.optimizers:
                raise ValueError("BNWatchCallback: the trainer has no optimizer to watch")
            # trainer.model is the DDP wrapper under DDP: the watcher looks at its buffers.
            self.start(trainer.model or pl_module, trainer.optimizers[0])

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.stop()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self.stop()

    return BNWatchCallback


def _make_transformers() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError(
            "bnaudit.integrations.watching.BNWatchTrainerCallback needs transformers: pip "
            "install transformers; in a plain loop, use bnaudit.watch(model, optimizer)"
        ) from None

    class BNWatchTrainerCallback(_Watching, TrainerCallback):
        """Watch every BN layer of the Trainer's model at each optimizer step of `train()`;
        the report is in `self.report` once training ends."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _Watching.__init__(self, *args, **kwargs)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            model, optimizer = kw.get("model"), kw.get("optimizer")
            if model is None or optimizer is None:
                raise ValueError("BNWatchTrainerCallback: the Trainer passed no model or optimizer")
            self.start(model, optimizer)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.stop()

    return BNWatchTrainerCallback


_FACTORIES = {"BNWatchCallback": _make_lightning, "BNWatchTrainerCallback": _make_transformers}


def __getattr__(name: str) -> Any:
    # Built on first use, so that importing this module needs neither framework.
    if name in _FACTORIES:
        cls = _FACTORIES[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'bnaudit.integrations.watching' has no attribute {name!r}")
