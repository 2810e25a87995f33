"""The watcher inside Lightning and Hugging Face transformers: a real `fit`/`train()` of the
tests' small net, once healthy and once with a planted double update. Each test skips, with
the reason, when its framework is not installed."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tests import training
from tests.training import BN, Net


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pytest.skip("PyTorch Lightning is not installed (pip install lightning)")
    return pl


def _module(pl, checkpointed: tuple[int, ...]):
    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net(checkpointed=checkpointed)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 1e-3)

    return Classifier()


def _loader(count: int) -> torch.utils.data.DataLoader:
    """The tests' batches as they are (batch_size=None: already batched)."""
    return torch.utils.data.DataLoader(training.batches(count), batch_size=None)


def _fit(pl, checkpointed: tuple[int, ...], **callback):
    from bnaudit.integrations.watching import BNWatchCallback

    torch.manual_seed(0)
    watcher = BNWatchCallback(**callback)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[watcher],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice (num_workers, ...) is not ours
        trainer.fit(_module(pl, checkpointed), _loader(3))
    return watcher


@pytest.mark.parametrize(("checkpointed", "found"), [((), set()), ((2,), {"net.blocks.2.1"})])
def test_lightning_fit_is_watched_step_by_step(checkpointed, found) -> None:
    pl = _lightning()
    watcher = _fit(pl, checkpointed)
    report = watcher.report
    assert report is not None and report.watched == 3 and watcher.watcher is None
    assert {f.layer for f in report.findings} == found
    assert {f.code for f in report.findings} <= {"double-update"}
    assert {layer.name for layer in report.layers} == {f"net.{name}" for name in BN}


def test_lightning_accumulation_is_counted() -> None:
    pl = _lightning()
    from bnaudit.integrations.watching import BNWatchCallback

    torch.manual_seed(0)
    watcher = BNWatchCallback()
    trainer = pl.Trainer(
        max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[watcher],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_module(pl, ()), _loader(4))
    report = watcher.report
    assert report is not None and report.findings == [] and report.watched == 2
    assert report.layer("net.blocks.0.1").metrics.updates == 4


def _transformers():
    try:
        import transformers
    except ImportError:
        pytest.skip("transformers is not installed (pip install transformers accelerate)")
    try:
        import accelerate  # noqa: F401  (Trainer needs it)
    except ImportError:
        pytest.skip("transformers' Trainer needs accelerate, which is not installed")
    return transformers


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.items = [(x[i], y[i]) for x, y in training.batches(n) for i in range(len(y))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i]
        return {"x": x, "labels": y}


class _HFNet(torch.nn.Module):
    """What the Trainer expects of a model: keyword inputs, a dict with the loss."""

    def __init__(self, checkpointed: tuple[int, ...]) -> None:
        super().__init__()
        self.net = Net(checkpointed=checkpointed)

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize(("checkpointed", "found"), [((), set()), ((0,), {"net.blocks.0.1"})])
def test_transformers_trainer_is_watched_step_by_step(tmp_path, checkpointed, found) -> None:
    transformers = _transformers()
    from bnaudit.integrations.watching import BNWatchTrainerCallback

    torch.manual_seed(0)
    watcher = BNWatchTrainerCallback()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=training.BATCH,
        report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=_HFNet(checkpointed), args=args, train_dataset=_Dataset(3), callbacks=[watcher]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    report = watcher.report
    assert report is not None and report.watched == 3
    assert {f.layer for f in report.findings} == found
    assert {f.code for f in report.findings} <= {"double-update"}


def test_the_callbacks_say_what_to_install_when_the_framework_is_missing(monkeypatch) -> None:
    import builtins

    from bnaudit.integrations import watching

    real = builtins.__import__

    def no_frameworks(name, *args, **kwargs):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "transformers"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_frameworks)
    # The classes are built by these on first use; built now, they meet no framework.
    with pytest.raises(ImportError, match="pip install lightning"):
        watching._make_lightning()
    with pytest.raises(ImportError, match="pip install transformers"):
        watching._make_transformers()
