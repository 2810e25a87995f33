"""What `bnaudit check` accepts: checkpoint containers, --model specs, --data formats, and the
clear exit-2 errors for everything it cannot use. Everything runs on the small MLP of
tests/nets.py, so each audit takes milliseconds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner, Result

from bnaudit.cli import app
from tests import nets

NETS_FILE = Path(nets.__file__).resolve()
MLP_SPEC = f"{NETS_FILE}:build_mlp"
MLP_LAYERS = ["1", "4", "7", "10"]

runner = CliRunner()


def invoke(*args: Any) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def audit_json(*args: Any) -> tuple[Result, dict[str, Any]]:
    """Run `bnaudit check ARGS --format json`; the parsed stdout ({} when there is none)."""
    result = invoke("check", *args, "--format", "json")
    return result, json.loads(result.stdout) if result.stdout else {}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def layer_summary(doc: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    return [
        (layer["name"], layer["verdict"], sorted(f["code"] for f in layer["findings"]))
        for layer in doc["layers"]
    ]


def assert_clean_error(result: Result, *fragments: str) -> None:
    """Exit 2, one line on stderr that contains every fragment, no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("bnaudit: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.fixture
def stale_mlp(healthy_mlp: nn.Module) -> nn.Module:
    """The healthy MLP after its second Linear was rescaled: BN "4" has stale running stats,
    a local disagreement (BN "1" and "7" fit the data), so the finding fails."""
    model = copy.deepcopy(healthy_mlp)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model[3].weight.mul_(
            (1.5 + 1.5 * torch.rand(model[3].out_features, generator=gen))[:, None]
        )
    return model


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.pt"
    torch.save(nets.mlp_data(4 * nets.TRAIN_BATCH, seed=5), path)
    return path


@pytest.fixture
def healthy_ckpt(tmp_path: Path, healthy_mlp: nn.Module) -> Path:
    path = tmp_path / "healthy.pt"
    torch.save(healthy_mlp.state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------
# Checkpoint containers


def _prefixed(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in sd.items()}


CONTAINERS: dict[str, Callable[[dict[str, Tensor]], Any]] = {
    "key-state_dict": lambda sd: {"state_dict": sd},
    "key-model_state_dict": lambda sd: {"model_state_dict": sd, "epoch": 7},
    "key-model": lambda sd: {"model": sd, "args": {"lr": 0.1}},
    "ddp-module-prefix": lambda sd: _prefixed(sd, "module."),
    "ddp-under-key": lambda sd: {"model_state_dict": _prefixed(sd, "module.")},
    "lightning": lambda sd: {"state_dict": _prefixed(sd, "model."), "epoch": 3},
}


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_checkpoint_containers_audit_the_same(
    container: str, stale_mlp: nn.Module, data: Path, tmp_path: Path
) -> None:
    sd = stale_mlp.state_dict()
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(sd, plain)
    torch.save(CONTAINERS[container](dict(sd)), wrapped)

    base, base_doc = audit_json(plain, "--model", MLP_SPEC, "--data", data)
    result, doc = audit_json(wrapped, "--model", MLP_SPEC, "--data", data)
    assert base.exit_code == 1, base.stderr  # the stale layer: verdicts worth comparing
    assert result.exit_code == 1, result.stderr
    assert layer_summary(doc) == layer_summary(base_doc)
    assert [layer["metrics"] for layer in doc["layers"]] == [
        layer["metrics"] for layer in base_doc["layers"]
    ]
    assert doc["sha256"] == sha256(wrapped)


def test_pytorch_tutorial_checkpoint_with_a_tensor_loss(
    stale_mlp: nn.Module, data: Path, tmp_path: Path
) -> None:
    """The "general checkpoint" of the PyTorch tutorial (Saving and Loading Models) keeps the
    last loss, a tensor, next to model_state_dict: the state dict is still under that key."""
    sd = stale_mlp.state_dict()
    plain, general = tmp_path / "plain.pt", tmp_path / "general.pt"
    torch.save(sd, plain)
    optimizer = torch.optim.SGD(stale_mlp.parameters(), lr=0.1)
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": sd,
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": torch.tensor(0.25),
        },
        general,
    )
    base, base_doc = audit_json(plain, "--model", MLP_SPEC, "--data", data)
    result, doc = audit_json(general, "--model", MLP_SPEC, "--data", data)
    assert result.exit_code == base.exit_code == 1, result.stderr
    assert layer_summary(doc) == layer_summary(base_doc)


def test_pickled_module_is_refused_without_trust(
    healthy_mlp: nn.Module, data: Path, tmp_path: Path
) -> None:
    path = tmp_path / "whole.pt"
    torch.save(healthy_mlp, path)
    before = sha256(path)
    result = invoke("check", path, "--model", MLP_SPEC, "--data", data)
    assert_clean_error(result, str(path), "--trust", "BatchNorm1d")
    assert "auditing" not in result.stderr
    assert sha256(path) == before


def test_pickled_module_is_audited_with_trust(
    healthy_mlp: nn.Module, data: Path, tmp_path: Path
) -> None:
    path = tmp_path / "whole.pt"
    torch.save(healthy_mlp, path)
    before = sha256(path)
    result, doc = audit_json(path, "--trust", "--data", data)  # no --model: the file has it
    assert result.exit_code == 0, result.stderr
    assert "pickled module" in result.stderr
    assert [layer["name"] for layer in doc["layers"]] == MLP_LAYERS
    assert doc["summary"]["batches"] == 4
    assert doc["sha256"] == before == sha256(path)


def _missing(sd: dict[str, Tensor]) -> list[str]:
    del sd["4.weight"], sd["7.running_var"]
    return ["4.weight", "7.running_var"]


def _unexpected(sd: dict[str, Tensor]) -> list[str]:
    sd["extra.weight"] = torch.zeros(3)
    sd["head.bias"] = torch.zeros(3)
    return ["extra.weight", "head.bias"]


def _shape(sd: dict[str, Tensor]) -> list[str]:
    sd["0.weight"] = torch.zeros(32, 21)
    return ["0.weight"]


@pytest.mark.parametrize("mutate", [_missing, _unexpected, _shape], ids=lambda f: f.__name__[1:])
def test_state_dict_not_fitting_the_model(
    mutate: Callable[[dict[str, Tensor]], list[str]],
    healthy_mlp: nn.Module,
    data: Path,
    tmp_path: Path,
) -> None:
    sd = dict(healthy_mlp.state_dict())
    offending = mutate(sd)
    path = tmp_path / "misfit.pt"
    torch.save(sd, path)
    result = invoke("check", path, "--model", MLP_SPEC, "--data", data)
    assert_clean_error(result, str(path), "does not fit --model", *offending)


# --------------------------------------------------------------------------------------------
# --model specs


FACTORIES = {
    "raises": "def build():\n    raise RuntimeError('kaboom in the factory')\n",
    "not-a-module": "def build():\n    return 42\n",
    "import-fails": "raise ImportError('broken on import')\n\n\ndef build():\n    pass\n",
}


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("file-missing", "no such file"),
        ("module-not-importable", "ModuleNotFoundError"),
        ("import-fails", "broken on import"),
        ("attribute-missing", "no_such_factory"),
        ("raises", "kaboom in the factory"),
        ("not-a-module", "int"),
    ],
)
def test_model_spec_errors(
    case: str, fragment: str, healthy_ckpt: Path, data: Path, tmp_path: Path
) -> None:
    if case == "file-missing":
        spec = f"{tmp_path / 'nowhere.py'}:build"
    elif case == "module-not-importable":
        spec = "bnaudit_no_such_package.models:build"
    elif case == "attribute-missing":
        spec = f"{NETS_FILE}:no_such_factory"
    else:
        factory = tmp_path / f"factory_{case.replace('-', '_')}.py"
        factory.write_text(FACTORIES[case])
        spec = f"{factory}:build"
    result = invoke("check", healthy_ckpt, "--model", spec, "--data", data)
    assert_clean_error(result, f"--model {spec}", fragment)


# --------------------------------------------------------------------------------------------
# --data formats

TWO_INPUTS = """\
import torch
from torch import nn


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 32)
        self.b = nn.Linear(4, 32)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 2)

    def forward(self, x, y):
        return self.head(torch.relu(self.bn(self.a(x) + self.b(y))))


def build():
    return TwoInputs()
"""


def two_input_batch(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen) + 0.5, 2 * torch.randn(n, 4, generator=gen)


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A model called as model(x, y): its --model spec and a calibrated checkpoint."""
    folder = tmp_path_factory.mktemp("two_inputs")
    factory = folder / "two_inputs.py"
    factory.write_text(TWO_INPUTS)
    torch.manual_seed(0)
    model = runpy.run_path(str(factory))["build"]()
    model.train()
    with torch.no_grad():
        for seed in range(100):
            model(*two_input_batch(32, seed=1000 + seed))
    ckpt = folder / "two_inputs.pt"
    torch.save(model.eval().state_dict(), ckpt)
    return f"{factory}:build", ckpt


def test_tuple_batches_are_passed_as_positional_arguments(
    two_inputs: tuple[str, Path], tmp_path: Path
) -> None:
    spec, ckpt = two_inputs
    path = tmp_path / "pairs.pt"
    torch.save([two_input_batch(32, seed=s) for s in range(3)], path)
    result, doc = audit_json(ckpt, "--model", spec, "--data", path)
    assert result.exit_code == 0, result.stderr
    assert doc["summary"]["batches"] == 3
    (bn,) = doc["layers"]
    assert bn["name"] == "bn"
    assert bn["metrics"]["calls"] == 3  # one train-mode call per batch
    assert bn["metrics"]["batch_size"] == 32


def test_dict_batches_are_passed_as_keyword_arguments(
    two_inputs: tuple[str, Path], tmp_path: Path
) -> None:
    spec, ckpt = two_inputs
    path = tmp_path / "dicts.pt"
    # Keys in the opposite order from the signature: only keywords put them in the right place.
    pairs = [two_input_batch(32, seed=s) for s in range(2)]
    torch.save([{"y": y, "x": x} for x, y in pairs], path)
    result, doc = audit_json(ckpt, "--model", spec, "--data", path)
    assert result.exit_code == 0, result.stderr
    assert doc["summary"]["batches"] == 2
    assert doc["layers"][0]["metrics"]["calls"] == 2


def _save_pt(obj: Any) -> Callable[[Path], Path]:
    def save(folder: Path) -> Path:
        path = folder / "batches.pt"
        torch.save(obj, path)
        return path

    return save


def _save_npy(array: np.ndarray) -> Callable[[Path], Path]:
    def save(folder: Path) -> Path:
        path = folder / "batches.npy"
        np.save(path, array)
        return path

    return save


def _save_npz(**arrays: np.ndarray) -> Callable[[Path], Path]:
    def save(folder: Path) -> Path:
        path = folder / "batches.npz"
        np.savez(path, **arrays)
        return path

    return save


def _mlp(n: int, seed: int = 5) -> Tensor:
    return nets.mlp_data(n, seed=seed)


@pytest.mark.parametrize(
    ("save", "extra", "batches", "smallest"),
    [
        # 100 samples at 25: four batches of 25
        pytest.param(_save_pt(_mlp(100)), ["--batch-size", "25"], 4, 25, id="pt-tensor-split"),
        # 101 samples at 25: the last batch of 1 sample is dropped, not run
        pytest.param(_save_pt(_mlp(101)), ["--batch-size", "25"], 4, 25, id="pt-tensor-tail"),
        pytest.param(_save_pt(_mlp(96)), [], 3, 32, id="pt-tensor-default-32"),
        pytest.param(_save_pt([_mlp(40, 1), _mlp(32, 2), _mlp(24, 3)]), [], 3, 24, id="pt-list"),
        pytest.param(
            _save_pt({"batches": [_mlp(32, 1), _mlp(20, 2)]}), [], 2, 20, id="pt-dict-batches"
        ),
        pytest.param(
            _save_pt(tuple(_mlp(32, s) for s in range(3))),
            ["--batch-size", "8"],
            3,
            32,
            id="pt-tuple-of-batches",
        ),
        pytest.param(_save_npy(_mlp(96).numpy()), ["--batch-size", "48"], 2, 48, id="npy-split"),
        pytest.param(_save_npy(_mlp(64).double().numpy()), [], 2, 32, id="npy-float64"),
        pytest.param(
            _save_npz(x=_mlp(96).numpy()), ["--batch-size", "48"], 2, 48, id="npz-one-array"
        ),
        pytest.param(
            _save_npz(b0=_mlp(40, 1).numpy(), b1=_mlp(32, 2).numpy(), b2=_mlp(24, 3).numpy()),
            ["--batch-size", "8"],
            3,
            24,
            id="npz-array-per-batch",
        ),
        pytest.param(
            _save_pt(_mlp(8 * 32)), ["--batches", "3"], 3, 32, id="batches-caps-the-count"
        ),
    ],
)
def test_data_formats(
    save: Callable[[Path], Path],
    extra: list[str],
    batches: int,
    smallest: int,
    healthy_ckpt: Path,
    tmp_path: Path,
) -> None:
    path = save(tmp_path)
    result, doc = audit_json(healthy_ckpt, "--model", MLP_SPEC, "--data", path, *extra)
    assert result.exit_code == 0, result.stderr
    assert doc["summary"]["batches"] == batches
    # audit: eval + train per batch; output impact: one more; fold check: the first batch
    assert doc["summary"]["forward_passes"] == 3 * batches
    for layer in doc["layers"]:
        assert layer["metrics"]["calls"] == batches
        assert layer["metrics"]["batch_size"] == smallest


DATA_MODULE = """\
from tests.nets import mlp_data


def batches():
    return [mlp_data(32, seed=s) for s in range(5)]


def one_tensor():
    return mlp_data(64, seed=9)
"""


@pytest.mark.parametrize(
    ("function", "extra", "count"),
    [("batches", [], 5), ("batches", ["--batches", "2"], 2), ("one_tensor", [], 2)],
)
def test_data_from_a_module_function_file(
    function: str, extra: list[str], count: int, healthy_ckpt: Path, tmp_path: Path
) -> None:
    module = tmp_path / "calib_data.py"
    module.write_text(DATA_MODULE)
    result, doc = audit_json(
        healthy_ckpt, "--model", MLP_SPEC, "--data", f"{module}:{function}", *extra
    )
    assert result.exit_code == 0, result.stderr
    assert doc["summary"]["batches"] == count


def test_data_from_a_dotted_module_in_the_working_directory(
    healthy_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "bnaudit_test_calib_module"
    (tmp_path / f"{name}.py").write_text(DATA_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        result, doc = audit_json(healthy_ckpt, "--model", MLP_SPEC, "--data", f"{name}:batches")
    finally:
        sys.modules.pop(name, None)
    assert result.exit_code == 0, result.stderr
    assert doc["summary"]["batches"] == 5


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing-file", ["missing.pt", "no such file"]),
        ("text-file-named-pt", ["notes.pt", "cannot read"]),
        ("empty-list", ["empty.pt", "non-empty"]),
        ("one-dim-tensor", ["flat.pt", "cannot be split"]),
        ("unknown-spec", ["no_such_thing", "no such file"]),
        ("function-raises", ["broken", "raised"]),
    ],
)
def test_bad_data_exits_2(
    case: str, fragments: list[str], healthy_ckpt: Path, tmp_path: Path
) -> None:
    if case == "missing-file":
        spec = str(tmp_path / "missing.pt")
    elif case == "text-file-named-pt":
        (tmp_path / "notes.pt").write_text("these are not tensors\n")
        spec = str(tmp_path / "notes.pt")
    elif case == "empty-list":
        torch.save([], tmp_path / "empty.pt")
        spec = str(tmp_path / "empty.pt")
    elif case == "one-dim-tensor":
        torch.save(torch.arange(10.0), tmp_path / "flat.pt")
        spec = str(tmp_path / "flat.pt")
    elif case == "unknown-spec":
        spec = "no_such_thing"
    else:
        (tmp_path / "broken.py").write_text("def batches():\n    raise OSError('disk gone')\n")
        spec = f"{tmp_path / 'broken.py'}:batches"
    result = invoke("check", healthy_ckpt, "--model", MLP_SPEC, "--data", spec)
    assert_clean_error(result, *fragments)


@pytest.mark.parametrize("how", ["batch-size-1", "list-of-single-samples"])
def test_single_sample_batches_exit_2_with_a_hint(
    how: str, healthy_ckpt: Path, tmp_path: Path
) -> None:
    path = tmp_path / "tiny.pt"
    if how == "batch-size-1":
        torch.save(_mlp(10), path)
        extra = ["--batch-size", "1"]
    else:
        torch.save([_mlp(1, seed=s) for s in range(3)], path)
        extra = []
    result = invoke("check", healthy_ckpt, "--model", MLP_SPEC, "--data", path, *extra)
    assert_clean_error(result, "--batch-size", "at least 2 samples")


# --------------------------------------------------------------------------------------------
# Unusable checkpoints


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing", "no such file"),
        ("directory", "directory"),
        ("empty", "empty"),
        ("text-renamed-pt", "a text file, not a checkpoint"),
        ("tensor-not-state-dict", "no state dict found"),
    ],
)
def test_unusable_checkpoint_exits_2(case: str, fragment: str, data: Path, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.touch()
    elif case == "text-renamed-pt":
        path.write_text("epoch,loss\n1,0.5\n2,0.4\n")
    elif case == "tensor-not-state-dict":
        torch.save(torch.zeros(3, 3), path)
    result = invoke("check", path, "--model", MLP_SPEC, "--data", data)
    assert_clean_error(result, str(path), fragment)
    assert len(result.stderr.strip().splitlines()) == 1
    if case == "text-renamed-pt":
        # Not a pickle of code: suggesting --trust would send the user the wrong way.
        assert "--trust" not in result.stderr


SHAPE_ASSERT = """\
from torch import nn


class Checked(nn.Sequential):
    def forward(self, x):
        assert x.shape[-1] == 6, f"expected 6 features, got {x.shape[-1]}"
        return super().forward(x)


def build():
    return Checked(nn.Linear(6, 8), nn.BatchNorm1d(8))
"""


def test_a_forward_that_asserts_its_input_shape_is_a_data_error(tmp_path: Path) -> None:
    """A bare `assert` in a forward (timm checks image sizes that way) is bad data, exit 2."""
    factory = tmp_path / "checked.py"
    factory.write_text(SHAPE_ASSERT)
    model = runpy.run_path(str(factory))["build"]().eval()
    ckpt, data = tmp_path / "checked.pt", tmp_path / "wrong.pt"
    torch.save(model.state_dict(), ckpt)
    torch.save([torch.randn(4, 5) for _ in range(2)], data)
    result = invoke("check", ckpt, "--model", f"{factory}:build", "--data", data)
    assert_clean_error(result, "forward failed on batch 0", "expected 6 features, got 5")
