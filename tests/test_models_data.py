"""Models and data in one line: registry names, factory arguments, folders of images.

timm and torchvision are not importable here (torchvision's compiled ops do not load against
this torch, and timm imports torchvision): stub modules in `sys.modules` stand in for them,
with the parts of their API that bnaudit calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner, Result

from bnaudit.cli import app
from bnaudit.core.errors import DataError, ModelError
from bnaudit.inputs.batches import load_batches
from bnaudit.inputs.images import DEFAULTS, ImageFolder, Preprocess, find_images, load_image
from bnaudit.inputs.registry import build_model, parse_model_args
from tests.test_cli import console_script

runner = CliRunner()

FACTORY = """
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)
        self.seen = []  # input shapes, to check the preprocessing

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.head(self.features(x))

def build(num_classes, width=8):
    return Net(num_classes, width)
"""


def invoke(*args: Any) -> Result:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(FACTORY)
    return path


def _checkpoint(path: Path, model: nn.Module) -> Path:
    torch.save(model.state_dict(), path)
    return path


def _images(folder: Path, count: int, size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """`count` random RGB images, PNG and JPEG, in two nested class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = folder / f"class{i % 2}" / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        suffix = ".png" if i % 2 else ".jpg"
        Image.fromarray(pixels).save(sub / f"img{i}{suffix}")
    (folder / "labels.txt").write_text("not an image\n")
    return folder


# --- factory arguments ---------------------------------------------------------------------


def test_model_args_are_python_literals() -> None:
    got = parse_model_args(["num_classes=10", "drop=0.5", "flag=True", "act=relu", "k=(1, 2)"])
    assert got == {"num_classes": 10, "drop": 0.5, "flag": True, "act": "relu", "k": (1, 2)}
    assert parse_model_args(["name='x=y'"]) == {"name": "x=y"}


@pytest.mark.parametrize("bad", ["num_classes", "=3", "1x=2"])
def test_model_arg_without_a_name_is_refused(bad: str) -> None:
    with pytest.raises(ModelError, match="expected NAME=VALUE"):
        parse_model_args([bad])


def test_model_arg_given_twice_is_refused() -> None:
    with pytest.raises(ModelError, match="given twice"):
        parse_model_args(["a=1", "a=2"])


def test_factory_needing_an_argument_says_how_to_pass_it(factory: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", build_model(f"{factory}:build", ["num_classes=4"]))
    result = invoke("check", ckpt, "--model", f"{factory}:build", "--input-shape", "4x3x8x8")
    assert result.exit_code == 2
    assert "the factory needs num_classes: pass --model-arg num_classes=VALUE" in result.output
    assert "Traceback" not in result.output


def test_unknown_factory_argument_lists_what_it_takes(factory: Path) -> None:
    with pytest.raises(ModelError, match=r"no argument depth \(it takes: num_classes, width\)"):
        build_model(f"{factory}:build", ["num_classes=4", "depth=3"])


def test_model_args_reach_the_factory_on_the_command_line(factory: Path, tmp_path: Path) -> None:
    model = build_model(f"{factory}:build", ["num_classes=4", "width=6"])
    assert model.head.out_features == 4 and model.features[1].num_features == 6
    ckpt = _checkpoint(tmp_path / "m.pt", model)
    args = ["check", ckpt, "--model", f"{factory}:build", "--input-shape", "4x3x8x8"]
    result = invoke(*args, "--model-arg", "num_classes=4", "--model-arg", "width=6")
    assert result.exit_code in (0, 1), result.output
    # Without width=6 the model has 8 channels: the checkpoint does not fit it.
    result = invoke(*args, "--model-arg", "num_classes=4")
    assert result.exit_code == 2 and "shape mismatch" in result.output


def test_model_args_without_a_model_are_refused(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", _small(2))
    result = invoke("check", ckpt, "--model-arg", "num_classes=2")
    assert result.exit_code == 2
    assert "--model-arg num_classes=2: arguments for the --model factory need --model" in (
        result.output
    )


def test_model_args_from_the_config_file(factory: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", build_model(f"{factory}:build", ["num_classes=3"]))
    config = tmp_path / "bnaudit.toml"
    config.write_text(
        f'model = "{factory}:build"\nmodel-args = ["num_classes=3"]\nmean = [0.5, 0.4, 0.3]\n'
    )
    result = invoke("check", ckpt, "--config", config, "--input-shape", "4x3x8x8")
    assert result.exit_code in (0, 1), result.output
    shown = invoke("config", ckpt, "--config", config)
    assert 'model-args = ["num_classes=3"]' in shown.output
    assert 'mean = "0.5,0.4,0.3"' in shown.output


# --- registries: timm and torchvision, stubbed -----------------------------------------------


class Recorder:
    """Records the calls a stub registry gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []


def _small(num_classes: int = 5) -> nn.Module:
    exec_globals: dict[str, Any] = {}
    exec(FACTORY, exec_globals)
    return exec_globals["build"](num_classes)


@pytest.fixture
def stub_timm(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    timm = types.ModuleType("timm")
    names = ["tinynet_a", "resnet18", "resnet50"]

    def create_model(name: str, **kwargs: Any) -> nn.Module:
        rec.calls.append((name, kwargs))
        kw = {k: v for k, v in kwargs.items() if k != "pretrained"}
        return _small(**kw)

    timm.create_model = create_model  # type: ignore[attr-defined]
    timm.list_models = lambda *a, **k: list(names)  # type: ignore[attr-defined]
    timm.is_model = lambda name: name in names  # type: ignore[attr-defined]
    data = types.ModuleType("timm.data")

    def resolve_data_config(args: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        rec.calls.append(("resolve_data_config", {"model": model}))
        return {
            "input_size": (3, 20, 20),
            "interpolation": "bicubic",
            "crop_pct": 0.8,
            "crop_mode": "center",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
        }

    data.resolve_data_config = resolve_data_config  # type: ignore[attr-defined]
    timm.data = data  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.data", data)
    return rec


@pytest.fixture
def stub_torchvision(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")

    def builder(**kwargs: Any) -> nn.Module:
        rec.calls.append(("resnet18", kwargs))
        return _small(**{k: v for k, v in kwargs.items() if k != "weights"})

    models.list_models = lambda *a, **k: ["resnet18", "resnet34"]  # type: ignore[attr-defined]
    models.get_model_builder = lambda name: builder  # type: ignore[attr-defined]
    tv.models = models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return rec


def test_timm_name_builds_without_pretrained_weights(stub_timm: Recorder, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", _small(7))
    args = ["check", ckpt, "--model", "timm:resnet18", "--model-arg", "num_classes=7"]
    result = invoke(*args, "--input-shape", "4x3x8x8")
    assert result.exit_code in (0, 1), result.output
    assert stub_timm.calls[0] == ("resnet18", {"pretrained": False, "num_classes": 7})


def test_timm_on_an_image_folder_uses_timms_data_config(
    stub_timm: Recorder, tmp_path: Path
) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", _small(5))
    folder = _images(tmp_path / "imgs", 9)
    result = invoke("check", ckpt, "--model", "timm:tinynet_a", "--data", folder, "--batch-size", 4)
    assert result.exit_code in (0, 1), result.output
    assert [c[0] for c in stub_timm.calls] == ["tinynet_a", "resolve_data_config"]
    # 9 images at batch size 4: 4 + 4, the last single image dropped; 20/0.8 = 25 then crop 20.
    assert "9 images in 2 batches of 4" in result.output
    assert "resize shorter side to 25 (bicubic), center crop 20x20" in result.output
    assert "timm's data config for tinynet_a" in result.output
    model = stub_timm.calls[1][1]["model"]
    assert set(model.seen) == {(4, 3, 20, 20)}


def test_unknown_timm_model_suggests_the_nearest(stub_timm: Recorder) -> None:
    with pytest.raises(ModelError, match=r"timm has no model 'resnet51'; did you mean resnet50"):
        build_model("timm:resnet51")


def test_a_module_spec_into_timm_hints_at_the_registry_name(stub_timm: Recorder) -> None:
    with pytest.raises(ModelError, match=r"pass --model timm:resnet18"):
        build_model("timm.models:resnet18")
    with pytest.raises(ModelError, match=r"--model timm:resnet18 or --model torchvision:resnet18"):
        build_model("resnet18")


def test_pretrained_weights_are_refused(stub_timm: Recorder, stub_torchvision: Recorder) -> None:
    with pytest.raises(ModelError, match="never downloads"):
        build_model("timm:resnet18", ["pretrained=True"])
    with pytest.raises(ModelError, match="never downloads"):
        build_model("torchvision:resnet18", ["weights='DEFAULT'"])
    assert stub_timm.calls == [] and stub_torchvision.calls == []


def test_torchvision_name_builds_with_weights_none(stub_torchvision: Recorder) -> None:
    model = build_model("torchvision:resnet18", ["num_classes=3"])
    assert model.head.out_features == 3
    assert stub_torchvision.calls == [("resnet18", {"weights": None, "num_classes": 3})]
    with pytest.raises(ModelError, match="torchvision has no model 'resnet19'; did you mean"):
        build_model("torchvision:resnet19")


def test_missing_registry_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModelError, match=r"needs timm, which is not installed: pip install timm"):
        build_model("timm:resnet50")


def test_torchvision_ops_that_do_not_load_get_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What importing timm does here: torchvision's compiled ops fail to register."""
    package = tmp_path / "site" / "timm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ModelError) as info:
        build_model("timm:resnet50")
    text = str(info.value)
    assert "torchvision's compiled ops do not load" in text
    assert "operator torchvision::nms does not exist" in text
    assert "Install the torchvision release made for this torch" in text


# --- folders of images ------------------------------------------------------------------------


def test_constant_image_is_normalised_per_channel(tmp_path: Path) -> None:
    color = (200, 100, 0)
    path = tmp_path / "c.png"
    Image.new("RGB", (50, 30), color).save(path)
    p = Preprocess((16, 16), 0.875, "bilinear", (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    x = load_image(path, p)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    for c in range(3):
        expected = (color[c] / 255 - p.mean[c]) / p.std[c]
        torch.testing.assert_close(x[c], torch.full((16, 16), expected), atol=1e-6, rtol=0)


def test_resize_then_center_crop_like_torchvision(tmp_path: Path) -> None:
    """A 64x32 image with a bright left half: resized (shorter side 32/0.5 = 64 → 128x64),
    then cropped to the middle 32x32, which straddles the edge at column 16."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = 255
    path = tmp_path / "half.png"
    Image.fromarray(pixels).save(path)
    p = Preprocess((32, 32), 0.5, "nearest", (0, 0, 0), (1, 1, 1))
    assert p.resize_to() == (64, 64)
    x = load_image(path, p)
    assert x.shape == (3, 32, 32)
    # Resized to 128x64 the edge is at column 64; the crop spans columns 48..80.
    assert torch.all(x[:, :, :16] == 1.0) and torch.all(x[:, :, 16:] == 0.0)


def test_non_square_crops_keep_the_aspect_ratio_unless_squashed(tmp_path: Path) -> None:
    """A 40x40 image, its top quarter white, to a 10x20 (HxW) crop at crop_pct 1: "center"
    scales it to cover 10x20 (20x20) and crops rows 5..15, all black; "squash" resizes it to
    10x20 exactly, keeping the white top rows."""
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[:10] = 255
    Image.fromarray(pixels).save(tmp_path / "q.png")
    center = Preprocess((10, 20), 1.0, "nearest", (0, 0, 0), (1, 1, 1))
    squash = Preprocess((10, 20), 1.0, "nearest", (0, 0, 0), (1, 1, 1), crop_mode="squash")
    x = load_image(tmp_path / "q.png", center)
    assert x.shape == (3, 10, 20) and torch.all(x == 0.0)
    y = load_image(tmp_path / "q.png", squash)
    assert y.shape == (3, 10, 20)
    assert torch.all(y[:, :2] == 1.0) and torch.all(y[:, 3:] == 0.0)


def test_grayscale_and_rgba_images_become_rgb(tmp_path: Path) -> None:
    Image.new("L", (20, 20), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (20, 20), (10, 20, 30, 40)).save(tmp_path / "a.png")
    for name in ("g.png", "a.png"):
        assert load_image(tmp_path / name, DEFAULTS).shape == (3, 224, 224)


def test_folder_is_found_recursively_and_replays_the_same_batches(tmp_path: Path) -> None:
    folder = _images(tmp_path / "imgs", 7)
    batches = load_batches(str(folder), 3, preprocess=DEFAULTS)
    assert isinstance(batches, ImageFolder)
    assert len(batches.files) == 7 and len(batches) == 2  # 3 + 3; a last single one dropped
    first = [b.clone() for b in batches]
    again = list(batches)
    assert [b.shape for b in first] == [(3, 3, 224, 224)] * 2
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_large_folder_is_sampled_with_the_seed(tmp_path: Path) -> None:
    folder = _images(tmp_path / "imgs", 12, size=(4, 4))
    files, total = find_images(folder, 5, seed=0)
    assert total == 12 and len(files) == 5 and files == sorted(files)
    assert files == find_images(folder, 5, seed=0)[0]
    assert files != find_images(folder, 5, seed=1)[0]
    # Not simply the first names in order (class folders sort together).
    assert files != sorted(find_images(folder, None, seed=0)[0])[:5]


def test_image_options_on_the_command_line(factory: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", build_model(f"{factory}:build", ["num_classes=2"]))
    folder = _images(tmp_path / "imgs", 6)
    args = ["check", ckpt, "--model", f"{factory}:build", "--model-arg", "num_classes=2"]
    args += ["--data", folder, "--batch-size", 3, "--image-size", 24]
    result = invoke(*args, "--mean", "0.5", "--std", "0.2,0.3,0.4")
    assert result.exit_code in (0, 1), result.output
    assert "resize shorter side to 27 (bilinear), center crop 24x24" in result.output
    assert "mean (0.5, 0.5, 0.5), std (0.2, 0.3, 0.4)" in result.output
    assert "--image-size --mean --std from the command line" in result.output
    result = invoke(*args, "--mean", "0.5,0.5")
    assert result.exit_code == 2 and "give 3 numbers, one per channel" in result.output


def test_batches_cap_the_images(factory: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", build_model(f"{factory}:build", ["num_classes=2"]))
    folder = _images(tmp_path / "imgs", 10, size=(8, 8))
    args = ["check", ckpt, "--model", f"{factory}:build", "--model-arg", "num_classes=2"]
    result = invoke(*args, "--data", folder, "--batch-size", 2, "--batches", 2, "--image-size", 8)
    assert result.exit_code in (0, 1), result.output
    assert "4 of 10 images (a sample, seed 0) in 2 batches of 2" in result.output


def test_an_image_file_as_data_says_pass_its_folder(factory: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", build_model(f"{factory}:build", ["num_classes=2"]))
    folder = _images(tmp_path / "imgs", 2)
    image = next(folder.rglob("*.jpg"))
    renamed = tmp_path / "batch.pt"  # an image under a torch name: recognised by its bytes
    renamed.write_bytes(image.read_bytes())
    for path in (image, renamed):
        result = invoke(
            "check", ckpt, "--model", f"{factory}:build", "--model-arg", "num_classes=2",
            "--data", path,
        )  # fmt: skip
        assert result.exit_code == 2
        assert "this is an image; pass its folder" in result.output
        assert "weights_only" not in result.output


def test_a_folder_without_images_says_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no image under this folder \(it holds .txt files\)"):
        load_batches(str(tmp_path / "d"), 4)


def test_one_image_is_not_enough_for_batchnorm(tmp_path: Path) -> None:
    folder = _images(tmp_path / "imgs", 1)
    with pytest.raises(DataError, match="BN needs at least 2 images per batch"):
        load_batches(str(folder), 4)


def test_a_corrupt_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(DataError, match=r"bad.jpg: PIL cannot decode it"):
        load_image(tmp_path / "bad.jpg", DEFAULTS)


def test_without_pillow_the_message_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = _images(tmp_path / "imgs", 3)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match=r"pip install 'bnaudit\[images\]'"):
        load_batches(str(folder), 2)


def test_image_options_without_an_image_folder_are_refused(factory: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", build_model(f"{factory}:build", ["num_classes=2"]))
    data = tmp_path / "x.pt"
    torch.save(torch.randn(8, 3, 8, 8), data)
    result = invoke(
        "check", ckpt, "--model", f"{factory}:build", "--model-arg", "num_classes=2",
        "--data", data, "--mean", "0.5",
    )  # fmt: skip
    assert result.exit_code == 2 and "preprocess a folder of images" in result.output


# --- the console script, with a stub timm package on PYTHONPATH ------------------------------

STUB_TIMM = """
from torch import nn

def list_models(*args, **kwargs):
    return ["tiny"]

def is_model(name):
    return name == "tiny"

def create_model(name, pretrained=True, num_classes=1000):
    assert pretrained is False, "bnaudit must not ask for pretrained weights"
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, num_classes),
    )
"""
STUB_TIMM_DATA = """
def resolve_data_config(args=None, pretrained_cfg=None, model=None, **kwargs):
    return {"input_size": (3, 12, 12), "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "center", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
"""


@pytest.mark.slow
def test_console_script_audits_a_timm_model_on_an_image_folder(tmp_path: Path) -> None:
    site = tmp_path / "site" / "timm"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(STUB_TIMM)
    (site / "data.py").write_text(STUB_TIMM_DATA)
    sys.path.insert(0, str(tmp_path / "site"))
    try:
        import timm  # the stub, to save the checkpoint it will load

        ckpt = _checkpoint(tmp_path / "m.pt", timm.create_model("tiny", False, num_classes=2))
    finally:
        sys.path.remove(str(tmp_path / "site"))
        sys.modules.pop("timm", None)
    folder = _images(tmp_path / "imgs", 8)
    proc = subprocess.run(
        [console_script(), "check", ckpt, "--model", "timm:tiny", "--model-arg", "num_classes=2",
         "--data", folder, "--batch-size", "4", "--format", "json"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    notes = json.loads(proc.stdout)["summary"]["notes"]
    assert any(
        "8 images in 2 batches of 4; resize shorter side to 12 (bilinear), center crop 12x12" in n
        and "timm's data config for tiny" in n
        for n in notes
    ), notes
