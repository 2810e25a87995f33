"""The training examples of the README and docs/training.md run as written, on the tests'
small net: the plain loop always, the Lightning and transformers ones where installed."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import bnaudit
from tests import training
from tests.test_watch_integrations import _Dataset, _HFNet, _lightning, _module, _transformers

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(page: str, section: str = "") -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    if section:
        text = text.split(section, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def run(code: str, **names: Any) -> dict[str, Any]:
    namespace = {"bnaudit": bnaudit, "F": F, **names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frameworks' advice (num_workers, ...) is not ours
        exec(compile(code, "<docs>", "exec"), namespace)
    return namespace


def plain_loop() -> dict[str, Any]:
    torch.manual_seed(0)
    model = training.Net()
    return {"model": model, "optimizer": training.sgd(model), "loader": training.batches(3)}


def test_the_readme_loop_runs_and_watches_three_healthy_steps() -> None:
    (code,) = python_blocks("README.md", "## Training")
    w = run(code, **plain_loop())["w"]
    report = w.report()
    assert report.watched == 3 and report.passed and w.closed


def test_the_plain_loop_of_docs_training_runs_and_prints_the_report(capsys) -> None:
    code = python_blocks("docs/training.md")[0]
    run(code, **plain_loop())
    assert (
        "PASS: no finding at warn or worse; 3 BN layers watched over 3" in capsys.readouterr().out
    )


def test_the_lightning_example_runs(tmp_path, monkeypatch, capsys) -> None:
    pl = _lightning()
    import lightning

    monkeypatch.chdir(tmp_path)  # Lightning writes its logs and checkpoints here
    code = next(b for b in python_blocks("docs/training.md") if "BNWatchCallback" in b)
    code = code.replace("max_epochs=10", "max_epochs=1, enable_progress_bar=False")
    loader = torch.utils.data.DataLoader(training.batches(3), batch_size=None)
    run(code, lightning=lightning, module=_module(pl, ()), loader=loader)
    assert "watched over 3 optimizer steps" in capsys.readouterr().out


def test_the_transformers_example_runs(tmp_path, capsys) -> None:
    transformers = _transformers()
    code = next(b for b in python_blocks("docs/training.md") if "BNWatchTrainerCallback" in b)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=training.BATCH,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    run(code, transformers=transformers, model=_HFNet(()), args=args, data=_Dataset(2))
    assert "watched over 2 optimizer steps" in capsys.readouterr().out
