"""bnaudit under torch.distributed: 2 or 3 gloo ranks on the CPU, started from the test.

The reference is always the single-process run over the same batches: the merged report must
equal it, every number to float64 rounding and every finding identical. Ranks are started as
torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the
environment), once through torchrun itself, and with a bounded wait: a hang fails the test.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from bnaudit.cli import app
from tests import nets

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

BATCH = 16
BATCHES = 5  # over 2 ranks: 3 and 2; over 3 ranks: 2, 2 and 1
STALE = "4"  # the BN layer planted stale (build_mlp's second)
WAIT_S = 120  # per launch; the ranks' own timeout is far below it
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A calibrated MLP with one layer planted stale, its data, and a sharding data function."""
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    model = nets.build_mlp()
    nets.calibrate(model, nets.mlp_data(60 * BATCH, seed=1), BATCH)
    bn = dict(model.named_modules())[STALE]
    with torch.no_grad():
        bn.running_mean += 2.0 * bn.running_var.sqrt()
    torch.save(model.state_dict(), root / "model.pt")
    torch.save(nets.mlp_data(BATCHES * BATCH, seed=5), root / "data.pt")
    (root / "shards.py").write_text(
        "import torch\n\n\n"
        "def batches(rank, world_size):\n"
        f"    x = torch.load({str(root / 'data.pt')!r})\n"
        f"    mine = range(rank, {BATCHES}, world_size)\n"
        f"    out = [x[i * {BATCH}:(i + 1) * {BATCH}] for i in mine]\n"
        "    if rank == 1:\n"
        "        out[-1] = out[-1][:, :7]  # the wrong width: the first Linear fails\n"
        "    return out\n"
    )
    return {"root": root, "model": root / "model.pt", "data": root / "data.pt"}


MODEL = f"{ROOT / 'tests' / 'nets.py'}:build_mlp"


def _args(files: dict[str, Path], *extra: str, data: str | None = None) -> list[str]:
    data = data or str(files["data"])
    return ["check", str(files["model"]), "--model", MODEL, "--data", data, "--batch-size",
            str(BATCH), *extra]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(world: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GITHUB_ACTIONS"):
        env.pop(key, None)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",  # as torchrun sets it: the ranks share two cores
        BNAUDIT_DIST_TIMEOUT="60",
    )
    return env


def launch(args: list[str], world: int, tmp: Path) -> list[tuple[int, str, str]]:
    """Start `world` ranks of `python -m bnaudit args`; (exit code, stdout, stderr) per rank."""
    env = _env(world)
    procs, logs = [], []
    for rank in range(world):
        out, err = tmp / f"out.{rank}", tmp / f"err.{rank}"
        with out.open("w") as o, err.open("w") as e:
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            cmd = [sys.executable, "-m", "bnaudit", *args]
            procs.append(subprocess.Popen(cmd, env=rank_env, stdout=o, stderr=e, cwd=ROOT))
        logs.append((out, err))
    deadline = time.monotonic() + WAIT_S
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks did not finish within {WAIT_S} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(c, o.read_text(), e.read_text()) for c, (o, e) in zip(codes, logs, strict=True)]


def single(args: list[str]) -> int:
    """The same command in this process, outside any job, on one thread as each rank runs:
    torch's float32 reductions (the BN output the audit measures) depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(app, args).exit_code
    finally:
        torch.set_num_threads(threads)


def assert_same_report(got: Any, want: Any, where: str = "report") -> None:
    """Equal JSON, floats to float64 rounding (derived metrics amplify it a little).

    The output impact is the exception: it runs the float32 model with the recalibrated
    statistics stored in the float32 buffers, where the merge order of the float64 means can
    flip the last float32 bit of a statistic, so it agrees to float32 rounding."""
    rel = 1e-5 if ".impact." in where + "." else 1e-9
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_report(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_report(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and isinstance(got, float):
        assert math.isclose(got, want, rel_tol=rel, abs_tol=1e-12) or (
            math.isnan(got) and math.isnan(want)
        ), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _findings(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (layer["name"], f["code"], f["severity"])
        for layer in report["layers"]
        for f in layer["findings"]
    ]


def test_torchrun_check_equals_the_single_process_report(files, tmp_path) -> None:
    want_json, got_json = tmp_path / "single.json", tmp_path / "merged.json"
    assert single(_args(files, "--json", str(want_json))) == 1  # the planted stale layer
    port = str(_free_port())
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", port,
        "-m", "bnaudit", *_args(files, "--json", str(got_json)),
    ]  # fmt: skip
    env = _env(2)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode != 0  # findings: each worker exits 1, and torchrun reports failure
    assert "exitcode  : 1" in done.stderr and "exitcode  : 2" not in done.stderr
    assert done.stdout.count("findings") >= 1 and done.stdout.count("layer  ") <= 1  # rank 0 only
    want, got = json.loads(want_json.read_text()), json.loads(got_json.read_text())
    assert (STALE, "stale-stats", "fail") in _findings(want)
    assert _findings(got) == _findings(want)
    assert got["summary"]["batches"] == BATCHES
    ran_on = got["summary"]["notes"].pop()  # the one note a single process does not have
    assert ran_on.startswith("audited on 2 ranks (torch.distributed)")
    assert_same_report(got, want)


def test_a_failing_rank_stops_every_rank_with_its_message(files, tmp_path) -> None:
    """The data function gets the rank: rank 1's last batch has the wrong width."""
    args = _args(files, data=f"{files['root'] / 'shards.py'}:batches")
    start = time.monotonic()
    ranks = launch(args, 2, tmp_path)
    assert time.monotonic() - start < WAIT_S
    assert [code for code, _, _ in ranks] == [2, 2], [err for _, _, err in ranks]
    for _, _, err in ranks:
        line = err.strip().splitlines()[-1]
        assert line.startswith("bnaudit: error: rank 1 of 2 failed: ")
        assert "forward failed on batch 1" in line and "Traceback" not in err


def test_recalibrate_under_ranks_equals_single_process(files, tmp_path) -> None:
    """3 ranks, --batches 2: rank 0 and 1 recalibrate on one batch each, rank 2 on none."""
    base = ["recalibrate", str(files["model"]), "--model", MODEL, "--batches", "2"]
    data = ["--data", str(files["data"]), "--batch-size", str(BATCH)]
    want_path, got_path = tmp_path / "single.pt", tmp_path / "merged.pt"
    assert single([*base, *data, "--output", str(want_path)]) == 0
    ranks = launch([*base, *data, "--output", str(got_path)], 3, tmp_path)
    assert [code for code, _, _ in ranks] == [0, 0, 0], [err for _, _, err in ranks]
    assert ranks[0][1] and not ranks[1][1] and not ranks[2][1]  # rank 0 alone prints
    want = torch.load(want_path, weights_only=True)
    got = torch.load(got_path, weights_only=True)
    assert got.keys() == want.keys()
    original = torch.load(files["model"], weights_only=True)
    changed = [k for k in want if not torch.equal(want[k], original[k])]
    assert f"{STALE}.running_mean" in changed  # the recalibration did something
    for key in want:
        if key.endswith("num_batches_tracked"):
            assert int(got[key]) == int(want[key]) == 2
        else:  # merged in float64, stored in float32: the same up to the last bit or so
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["merged.pt", "single.pt"]


# -- compare_ranks: three ranks in torch.multiprocessing, results through files ---------------


def _drift_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from bnaudit.distributed import compare_ranks, write_merged

        torch.manual_seed(0)
        model = DDP(nets.build_mlp(depth=2))  # names: module.1, ...; no forward, no broadcast
        results = {"same": compare_ranks(model)}
        bn = model.module[4]
        before = bn.running_mean.clone()
        with torch.no_grad():  # what a rank's own EMA on other batches leaves
            if rank == 2:
                bn.running_mean += 0.5 * bn.running_var.sqrt()
            bn.num_batches_tracked += int(rank == 2)
        results["drifted"] = compare_ranks(model)
        write_merged(model, results["drifted"])
        results["written"] = compare_ranks(model)
        summary = {
            key: [
                [d.name, d.shift, d.log_var, d.counter_spread, d.outlier, d.saved_shift]
                + [f.code for f in d.findings]
                for d in r.layers
            ]
            for key, r in results.items()
        }
        want = before + 0.5 * bn.running_var.sqrt() / world  # the mean over ranks
        summary["merged_ok"] = bool(torch.allclose(results["drifted"].merged["4"][0], want))
        Path(f"{out}.{rank}").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def test_compare_ranks_flags_the_outlier_rank_and_passes_identical_ranks(tmp_path) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "drift")
    mp.start_processes(
        _drift_worker, args=(3, _free_port(), out), nprocs=3, start_method="spawn", join=True
    )
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(3)]
    assert results[0] == results[1] == results[2]  # every rank gets the same report
    same, drifted = results[0]["same"], results[0]["drifted"]
    assert [row[0] for row in same] == ["1", "4"]  # DDP's module. prefix is stripped
    assert all(row[1:4] == [0.0, 0.0, 0] and row[4] is None and len(row) == 6 for row in same)
    assert results[0]["merged_ok"]
    first, second = drifted
    assert first[1:4] == [0.0, 0.0, 0] and len(first) == 6  # untouched layer: clean
    _, shift, _, spread, outlier, saved_shift, *codes = second
    assert codes == ["rank-drift"] and outlier == 2 and spread == 1
    # Rank 2 is 0.5 sds off; the merged mean is a third of the way to it.
    assert 0.25 < shift < 0.4 and 0.1 < saved_shift < 0.2
    # After write_merged every rank holds the merged statistics; the counters still differ.
    written = results[0]["written"][1]
    assert written[1:5] == [0.0, 0.0, 1, 2] and written[6:] == ["rank-drift"]


# -- without processes: sharding, the environment, autocast -----------------------------------


def test_batches_go_round_robin_and_caps_count_globally() -> None:
    from bnaudit.distributed import Ranks

    ranks = [Ranks(rank, 3) for rank in range(3)]
    assert [list(r.shard(range(8))) for r in ranks] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert [list(r.shard(range(8), cap=4)) for r in ranks] == [[0, 3], [1], [2]]
    assert [r.share(4) for r in ranks] == [2, 1, 1] and ranks[0].share(None) is None
    assert ranks[0].device("cuda") == "cuda:0" and Ranks(1, 2, 1).device("cuda") == "cuda:1"
    assert Ranks(1, 2, 1).device("cuda:0") == "cuda:0"  # an explicit index is kept


def test_torchrun_environment_is_read_and_checked(monkeypatch) -> None:
    from bnaudit.core.errors import BnauditError
    from bnaudit.distributed import ranks

    assert ranks.from_env({}) is None
    assert ranks.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == (1, 2, 0)
    with pytest.raises(BnauditError, match="RANK=2 is not below WORLD_SIZE=2"):
        ranks.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    monkeypatch.setenv(ranks.TIMEOUT_ENV, "-1")
    with pytest.raises(BnauditError, match="positive number of seconds"):
        ranks._timeout()


def test_autocast_bf16_measures_each_bn_in_the_dtype_it_ran_in() -> None:
    from bnaudit.check.audit import audit
    from bnaudit.inputs.precision import Autocast, autocast_forward

    torch.manual_seed(0)
    model = nets.build_mlp()
    nets.calibrate(model, nets.mlp_data(40 * BATCH, seed=1), BATCH)
    model.eval()
    batches = list(nets.mlp_data(4 * BATCH, seed=3).split(BATCH))
    plain = audit(model, batches, impact=False)
    with autocast_forward(model, Autocast.BF16, torch.device("cpu")):
        mixed = audit(model, batches, impact=False)
    assert "forward" not in model.__dict__  # the model's own forward is back
    for p, m in zip(plain.layers, mixed.layers, strict=True):
        # bfloat16 errors: far beyond float32's tolerance, within bfloat16's.
        assert m.metrics.train.recon.max_err > 1000 * p.metrics.train.recon.max_err
        assert 0 < m.metrics.train.recon.ratio <= 1 and 0 < m.metrics.eval.recon.ratio <= 1
    assert [f.code for f in mixed.findings] == [f.code for f in plain.findings]
