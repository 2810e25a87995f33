"""Batches and outputs as users have them: (images, labels) loaders, NamedTuples, dataclasses,
dicts, --input, and --data file.py:function."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from bnaudit.check.audit import audit
from bnaudit.cli import app
from bnaudit.core.errors import DataError
from bnaudit.inputs.calls import call_model, move_batch, parse_input, to_call
from bnaudit.inputs.containers import map_tensors
from tests import labelled

LABELLED = Path(labelled.__file__).resolve()
runner = CliRunner()


class Batch(NamedTuple):
    image: Tensor
    label: Tensor


class Outputs(NamedTuple):  # torchvision's InceptionOutputs / GoogLeNetOutputs shape
    logits: Tensor
    aux_logits: Tensor | None


@dataclasses.dataclass
class ModelOutput:  # a dataclass output, as Hugging Face-style models return
    logits: Tensor
    extras: dict[str, Any]


class TwoHeads(nn.Module):
    """The labelled MLP with a second head; returns `kind` of container."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.body = labelled.build()
        self.aux = nn.Linear(labelled.D_IN, labelled.CLASSES)
        self.kind = kind

    def forward(self, x: Tensor) -> Any:
        logits, aux = self.body(x), self.aux(x)
        if self.kind == "namedtuple":
            return Outputs(logits, aux)
        if self.kind == "dataclass":
            return ModelOutput(logits, {"aux": [aux, (aux,)]})
        return {"logits": logits, "aux": [aux, {"deep": (aux,)}]}


def _healthy_body(model: TwoHeads) -> TwoHeads:
    model.body.load_state_dict(labelled.trained(frozen_stats=False).state_dict())
    return model.eval()


@pytest.mark.parametrize("kind", ["namedtuple", "dataclass", "dict"])
def test_container_outputs_are_audited_and_scored(kind: str) -> None:
    model = _healthy_body(TwoHeads(kind))
    report = audit(model, labelled.loader())
    assert report.passed, [f.message for f in report.findings]
    assert report.impact is not None and report.impact.rel_l2 < 0.1
    # The class scores are found by their `logits` name in every container.
    assert report.impact.evidence is not None
    assert report.impact.evidence.stored > 0.7


def test_map_tensors_rebuilds_each_container_type() -> None:
    t = torch.ones(2)
    obj = {"a": Outputs(t, None), "b": [ModelOutput(t, {"x": (t,)})], "c": (t, 3)}
    out = map_tensors(lambda x: x * 2, obj)
    assert type(out["a"]) is Outputs and out["a"].aux_logits is None
    assert torch.equal(out["a"].logits, 2 * t)
    assert type(out["b"][0]) is ModelOutput and torch.equal(out["b"][0].extras["x"][0], 2 * t)
    assert out["c"][1] == 3 and isinstance(out["c"], tuple)


def test_namedtuple_batch_feeds_its_first_field_and_labels() -> None:
    model = labelled.trained(frozen_stats=False)
    x, y = labelled.task(256, 3)
    batches = [Batch(xb, yb) for xb, yb in zip(x.split(32), y.split(32), strict=True)]
    moved = move_batch(batches[0], torch.device("cpu"), torch.float32)
    assert type(moved) is Batch  # rebuilt with _make, not Batch(generator)
    report = audit(model, batches)
    assert report.passed
    assert any("NamedTuple" in n and "batch[0]" in n for n in report.notes), report.notes
    assert report.impact is not None and report.impact.evidence is not None
    by_field = audit(model, batches, input="image")
    assert by_field.impact is not None and by_field.impact.evidence is not None
    assert by_field.impact.evidence.stored == report.impact.evidence.stored


class TakesBoth(nn.Module):
    """A forward that needs both elements: the batch is spread, as before."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.bn(x * scale)


class TakesOptional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        if targets is not None:
            raise AssertionError("the labels must not reach the model")
        return self.bn(x)


def test_tuples_spread_only_when_the_forward_requires_every_element() -> None:
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    both = to_call(TakesBoth(), (x, torch.ones(8, 1)))
    assert len(both.args) == 2 and both.labels is None and not both.how
    optional = to_call(TakesOptional(), (x, y))
    assert optional.args[0] is x and optional.labels is y
    assert "batch[0]" in optional.how
    call_model(TakesOptional(), (x, y))  # raw batches follow the same convention
    one = to_call(nn.BatchNorm1d(4), [x])
    assert one.args == (x,)


def test_input_choice_index_key_and_errors() -> None:
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model = TakesOptional()
    assert parse_input("1") == 1 and parse_input("-1") == -1 and parse_input("image") == "image"
    swapped = to_call(model, (y, x), parse_input("1"))
    assert swapped.args[0] is x and swapped.labels is y
    keyed = to_call(model, {"pixels": x, "target": y}, "pixels")
    assert keyed.args[0] is x and keyed.labels is y
    spread = to_call(model, (x, y), "*")
    assert spread.args == (x, y) and spread.labels is None
    with pytest.raises(DataError, match="no such key"):
        to_call(model, {"pixels": x}, "image")
    with pytest.raises(DataError, match="2 elements"):
        to_call(model, (x, y), 5)
    with pytest.raises(DataError, match="not tuples"):
        to_call(model, x, 0)


def test_dict_batches_set_their_labels_aside() -> None:
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    c = to_call(TakesOptional(), {"x": x, "label": y})
    assert c.kwargs == {"x": x} and c.labels is y and "label" in c.how
    # A forward taking every key gets them all, labels included (it asked for them).
    assert set(to_call(TakesOptional(), {"x": x, "targets": y}).kwargs) == {"x", "targets"}


def test_shuffling_loader_pairs_each_batch_with_its_own_output() -> None:
    """A shuffling DataLoader yields other batches when iterated again: the impact passes
    must compare each batch's outputs with that batch's, not another's."""
    model = labelled.trained(frozen_stats=False)
    report = audit(model, labelled.loader(shuffle=True))
    assert report.impact is not None
    assert report.impact.rel_l2 < 0.1  # healthy: recalibrating barely moves the output
    assert report.impact.top1_agreement is not None and report.impact.top1_agreement > 0.9


def _checkpoint(tmp_path: Path, frozen: bool) -> Path:
    path = tmp_path / "model.pt"
    torch.save(labelled.trained(frozen_stats=frozen).state_dict(), path)
    return path


def test_cli_loader_from_a_file_function(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, frozen=False)
    result = runner.invoke(
        app, ["check", str(ckpt), "--model", f"{LABELLED}:build", "--data", f"{LABELLED}:loader"]
    )
    assert result.exit_code == 0, result.output
    assert "model(batch[0])" in result.output
    assert "top-1 accuracy on 512 labelled samples" in result.output


def test_cli_tuple_batches_in_a_file_and_input_option(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, frozen=False)
    x, y = labelled.task(256, 4)
    data = tmp_path / "calib.pt"
    torch.save([(yb, xb) for xb, yb in zip(x.split(32), y.split(32), strict=True)], data)
    base = ["check", str(ckpt), "--model", f"{LABELLED}:build", "--data", str(data)]
    wrong = runner.invoke(app, base)  # batch[0] is the labels here: the forward fails
    assert wrong.exit_code == 2, wrong.output
    right = runner.invoke(app, [*base, "--input", "1", "--json", str(tmp_path / "r.json")])
    assert right.exit_code == 0, right.output
    assert "model(batch[1]) (--input)" in right.output


def test_input_from_the_config_file(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, frozen=False)
    x, y = labelled.task(128, 4)
    torch.save(
        [(yb, xb) for xb, yb in zip(x.split(32), y.split(32), strict=True)], tmp_path / "d.pt"
    )
    (tmp_path / "bn.toml").write_text(
        f'model = "{LABELLED}:build"\ndata = "d.pt"\ninput = 1\n', encoding="utf-8"
    )
    result = runner.invoke(app, ["check", str(ckpt), "--config", str(tmp_path / "bn.toml")])
    assert result.exit_code == 0, result.output
    assert "model(batch[1]) (--input)" in result.output
