"""bnaudit.watch on real training loops built here: each planted mistake is found on exactly
the layers where it was planted, a healthy loop yields nothing, and the watcher leaves no hook
behind."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnaudit
from bnaudit.watching import BadTrainingStep
from tests import training
from tests.training import BN, Net, SharedNet, sgd, train


def codes(report) -> set[tuple[str, str]]:
    return {(f.layer, f.code) for f in report.findings}


def watched(model: nn.Module, optimizer=None, steps: int = 3, **options):
    optimizer = optimizer or sgd(model)
    loop = {k: options.pop(k) for k in ("extra_forward", "data") if k in options}
    accumulate = options.get("accumulate") or 1
    with bnaudit.watch(model, optimizer, **options) as w:
        train(model, optimizer, steps, accumulate=accumulate, **loop)
    return w.report()


def test_a_healthy_loop_yields_nothing_and_reads_the_momentum_from_the_buffers() -> None:
    torch.manual_seed(0)
    report = watched(Net())
    assert report.findings == [] and report.passed
    assert (report.steps, report.watched) == (3, 3)
    for layer in report.layers:
        m = layer.metrics
        assert (m.train_calls, m.updates, m.micro_batches, m.updates_per_step_max) == (3, 3, 3, 1)
        assert m.implied_momentum_median == pytest.approx(0.1, rel=1e-3)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_double_updates_exactly_the_checkpointed_layers(reentrant) -> None:
    torch.manual_seed(0)
    report = watched(Net(checkpointed=(1,), use_reentrant=reentrant))
    assert codes(report) == {("blocks.1.1", "double-update")}
    f = report.findings[0]
    assert (f.value, f.threshold) == (2.0, 1.0) and "steps 1, 2, 3" in f.message
    assert report.layer("blocks.1.1").metrics.updates == 6
    assert not report.passed


def test_model_eval_left_on_is_no_update_on_every_layer() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    report = watched(model)
    assert codes(report) == {(name, "no-update") for name in BN}
    assert "in eval mode" in report.findings[0].message


def test_a_frozen_backbone_in_train_mode_moves_its_stats_and_only_it_is_flagged() -> None:
    torch.manual_seed(0)
    model = Net()
    model.blocks[:2].requires_grad_(False)  # the backbone; block 2 and the head train
    report = watched(model)
    assert codes(report) == {
        ("blocks.0.1", "frozen-stats-moving"),
        ("blocks.1.1", "frozen-stats-moving"),
    }
    assert "requires_grad=False" in report.findings[0].message


def test_parameters_left_out_of_the_optimizer_count_as_frozen() -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.05)
    report = watched(model, optimizer)
    assert codes(report) == {(name, "frozen-stats-moving") for name in BN}
    assert "not in the optimizer" in report.findings[0].message


def test_declared_accumulation_of_four_is_no_finding_and_is_counted_without_it() -> None:
    torch.manual_seed(0)
    declared = watched(Net(), accumulate=4)
    assert declared.findings == []
    assert declared.layer("blocks.0.1").metrics.updates == 12
    counted = watched(Net(), accumulate=None, data=None)  # one micro-batch: still nothing
    assert counted.findings == []


def test_inferred_accumulation_counts_the_backward_passes() -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = sgd(model)
    with bnaudit.watch(model, optimizer) as w:
        train(model, optimizer, 2, accumulate=4)
    report = w.report()
    assert report.findings == []
    assert report.layer("blocks.2.1").metrics.micro_batches == 8


def test_a_second_forward_per_step_is_a_double_update_on_every_layer() -> None:
    torch.manual_seed(0)
    report = watched(Net(), extra_forward=True)
    assert codes(report) == {(name, "double-update") for name in BN}
    assert report.findings[0].value == 2.0


# -- a BN module shared by two convs: two call sites per forward, two updates by design ---------


def test_a_bn_shared_by_two_convs_updates_once_per_site_and_is_a_note_not_a_finding() -> None:
    torch.manual_seed(0)
    report = watched(SharedNet())
    assert report.findings == [] and report.passed
    shared, plain = report.layer("pair.bn").metrics, report.layer("tail.1").metrics
    assert (shared.sites, shared.updates, shared.micro_batches) == (2, 6, 3)
    assert (plain.sites, plain.updates) == (1, 3)
    [note] = [n for n in report.notes if "shared BN" in n]
    assert "pair.bn" in note and "2 sites" in note and "tail.1" not in note


def test_a_shared_bn_with_counted_accumulation_is_still_no_finding() -> None:
    torch.manual_seed(0)
    report = watched(SharedNet(), steps=2, accumulate=None, data=training.batches(6))
    assert report.findings == []
    model = SharedNet()
    optimizer = sgd(model)
    with bnaudit.watch(model, optimizer) as w:
        train(model, optimizer, 2, accumulate=3)
    metrics = w.report().layer("pair.bn").metrics
    assert w.report().findings == [] and (metrics.updates, metrics.micro_batches) == (12, 6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_of_a_shared_bn_is_a_double_update(reentrant) -> None:
    torch.manual_seed(0)
    report = watched(SharedNet(checkpointed=True, use_reentrant=reentrant))
    assert codes(report) == {("pair.bn", "double-update")}
    f = report.findings[0]
    # Two sites: 2 updates per step expected, 4 made (the recompute in backward adds 2).
    assert (f.value, f.threshold) == (4.0, 2.0)
    assert "2 of them outside the model's forward" in f.message


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_the_whole_model_is_a_second_forward_of_it(reentrant) -> None:
    torch.manual_seed(0)
    model = SharedNet()
    optimizer = sgd(model)
    with bnaudit.watch(model, optimizer) as w:
        for x, y in training.batches(2):
            optimizer.zero_grad()
            out = checkpoint(model, x.requires_grad_(), use_reentrant=reentrant)
            nn.functional.cross_entropy(out, y).backward()
            optimizer.step()
    found = {f.layer: f for f in w.report().findings}
    assert set(found) == {"pair.bn", "tail.1"} and found["pair.bn"].code == "double-update"
    assert (found["pair.bn"].value, found["pair.bn"].threshold) == (4.0, 2.0)
    assert "the model's forward ran twice" in found["pair.bn"].message


def test_a_second_forward_per_step_with_a_shared_bn_is_a_double_update() -> None:
    torch.manual_seed(0)
    report = watched(SharedNet(), extra_forward=True)
    assert codes(report) == {("pair.bn", "double-update"), ("tail.1", "double-update")}
    found = {f.layer: f for f in report.findings}
    assert (found["pair.bn"].value, found["pair.bn"].threshold) == (4.0, 2.0)
    assert (found["tail.1"].value, found["tail.1"].threshold) == (2.0, 1.0)
    assert "forward ran twice in train mode for 1 micro-batch" in found["pair.bn"].message


def test_a_layer_the_loop_calls_outside_the_models_forward_counts_as_one_site() -> None:
    """A submodule called by the loop itself (no forward of the watched model) is judged as
    before: one update per micro-batch, so a shared BN there is not told from a double one."""
    torch.manual_seed(0)
    model = Net()
    optimizer = sgd(model)
    with bnaudit.watch(model, optimizer) as w:
        for x, y in training.batches(2):
            optimizer.zero_grad()
            features = model.blocks[2](model.blocks[1](model.blocks[0](x)))
            nn.functional.cross_entropy(model.head(features.mean((2, 3))), y).backward()
            optimizer.step()
    report = w.report()
    assert report.findings == [] and report.layer("blocks.0.1").metrics.sites == 0


def test_a_forward_that_raises_leaves_the_models_forward() -> None:
    torch.manual_seed(0)
    model = SharedNet()
    optimizer = sgd(model)
    with bnaudit.watch(model, optimizer) as w:
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 5, 8, 8))  # 5 channels where 3 are expected
        train(model, optimizer, 2)
    assert w.report().findings == [] and w.report().layer("pair.bn").metrics.sites == 2


def test_declared_accumulation_with_checkpointing_still_flags_the_checkpointed_layer() -> None:
    torch.manual_seed(0)
    model = Net(checkpointed=(0,))
    report = watched(model, accumulate=2)
    assert codes(report) == {("blocks.0.1", "double-update")}
    assert (report.findings[0].value, report.findings[0].threshold) == (4.0, 2.0)


class HardMomentumBN(nn.BatchNorm2d):
    """A forward that passes its own momentum to F.batch_norm, whatever the attribute says."""

    def forward(self, x):
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.3, self.eps
        )


def test_an_effective_momentum_other_than_the_layers_is_a_momentum_mismatch() -> None:
    torch.manual_seed(0)
    model = Net()
    model.blocks[2][1] = HardMomentumBN(8)
    report = watched(model)
    assert codes(report) == {("blocks.2.1", "momentum-mismatch")}
    f = report.findings[0]
    assert f.value == pytest.approx(0.3, rel=1e-3) and f.threshold == pytest.approx(0.1)


def test_momentum_none_is_checked_against_one_over_the_count() -> None:
    torch.manual_seed(0)
    model = Net()
    for name in BN:
        model.get_submodule(name).momentum = None
    report = watched(model, steps=4)
    assert report.findings == []
    # 1/T over T = 1..4: the first update overwrites (factor 1), then 1/2, 1/3, 1/4.
    assert report.layer("blocks.0.1").metrics.implied_momentum_median == pytest.approx(
        (1 / 2 + 1 / 3) / 2, rel=1e-3
    )


def test_a_nan_batch_is_a_nonfinite_finding_with_its_step() -> None:
    torch.manual_seed(0)
    data = training.batches(3)
    data[1] = (data[1][0].clone().index_fill_(0, torch.tensor([0]), math.nan), data[1][1])
    report = watched(Net(), data=data)
    found = {(f.layer, f.code): f for f in report.findings if f.code == "nonfinite"}
    assert set(found) == {(name, "nonfinite") for name in BN}
    assert "(steps 2, 3)" in found[("blocks.0.1", "nonfinite")].message


def test_every_n_watches_only_every_nth_step() -> None:
    torch.manual_seed(0)
    report = watched(Net(checkpointed=(2,)), steps=7, every=3)
    assert (report.steps, report.watched) == (7, 3)
    f = report.findings[0]
    assert (f.layer, f.code) == ("blocks.2.1", "double-update")
    assert "steps 1, 4, 7" in f.message
    assert report.layer("blocks.0.1").metrics.train_calls == 3


def test_strict_raises_at_the_first_bad_step_naming_layer_and_cause_and_unhooks() -> None:
    torch.manual_seed(0)
    model = Net(checkpointed=(1,))
    optimizer = sgd(model)
    raised = pytest.raises(BadTrainingStep, match=r"step 1: BN layer blocks\.1\.1: double-update")
    with raised as e, bnaudit.watch(model, optimizer, strict=True):
        train(model, optimizer, 3)
    assert e.value.step == 1 and e.value.layer == "blocks.1.1"
    assert_no_hooks(model, optimizer)


def assert_no_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    assert not optimizer._optimizer_step_post_hooks


def test_close_removes_every_hook_and_changes_nothing_it_watched() -> None:
    torch.manual_seed(0)
    model, optimizer = Net(), None
    reference = Net()
    reference.load_state_dict(model.state_dict())
    optimizer, ref_opt = sgd(model), sgd(reference)
    w = bnaudit.watch(model, optimizer)
    train(model, optimizer, 2)
    w.close()
    w.close()  # idempotent
    train(reference, ref_opt, 2)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert_no_hooks(model, optimizer)
    assert w.report().watched == 2


def test_the_report_renders_in_every_format() -> None:
    torch.manual_seed(0)
    report = watched(Net(checkpointed=(1,)))
    assert "double-update" in report.render() and report.render().rstrip().endswith(
        "BN layers watched over 3 optimizer steps"
    )
    assert report.render("markdown").startswith("# bnaudit watch: FAIL")
    csv = report.render("csv").splitlines()
    assert csv[0].startswith("layer,type,verdict,codes") and len(csv) == 1 + len(BN)
    data = json.loads(report.render("json"))
    assert data["summary"]["verdict"] == "fail" and data["summary"]["watched"] == 3
    layer = next(entry for entry in data["layers"] if entry["name"] == "blocks.1.1")
    assert layer["findings"][0]["code"] == "double-update"
    with pytest.raises(ValueError, match="choose one of"):
        report.render("xml")


@pytest.mark.parametrize(
    ("options", "error"),
    [({"every": 0}, ValueError), ({"accumulate": 0}, ValueError), ({"every": 1.5}, TypeError)],
)
def test_bad_options_are_refused(options, error) -> None:
    model = Net()
    with pytest.raises(error, match=r"bnaudit\.watch"):
        bnaudit.watch(model, sgd(model), **options)
    assert_no_hooks(model, torch.optim.SGD(model.parameters()))


def test_no_step_is_a_note_not_a_verdict() -> None:
    model = Net()
    with bnaudit.watch(model, sgd(model)) as w:
        pass
    report = w.report()
    assert report.findings == [] and any("no optimizer step" in n for n in report.notes)


# -- DDP: two gloo ranks in torch.multiprocessing, results through files -----------------------


def _ddp(model: nn.Module, sync: bool) -> nn.Module:
    """DDP with or without the buffer broadcast before each forward (its name changed in 2.13)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    name = "forward_sync_buffers"
    if name not in inspect.signature(DDP.__init__).parameters:
        name = "broadcast_buffers"
    return DDP(model, **{name: sync})


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os
    from pathlib import Path

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for sync in (False, True):
            torch.manual_seed(0)
            model = _ddp(Net(), sync)
            optimizer = sgd(model)
            # Each rank sees its own data: rank 1's is shifted, as a sharded dataset can be.
            data = training.batches(3, seed=rank, shift=2.0 * rank)
            with bnaudit.watch(model, optimizer) as w:
                train(model, optimizer, 3, data=data)
            report = w.report()
            found = sorted({(f.layer, f.code) for f in report.findings})
            results[str(sync)] = {"found": found, "notes": report.notes}
        Path(f"{out}.{rank}").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_ddp_without_syncbn_drifts_apart_unless_buffers_are_synced(tmp_path) -> None:
    import socket
    from pathlib import Path

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "watch")
    mp.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, start_method="spawn", join=True)
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    assert results[0] == results[1]  # every rank reaches the same verdict
    drifting, synced = results[0]["False"], results[0]["True"]
    # The shift is planted in the input: the first BN drifts; later ones may follow it.
    assert ["blocks.0.1", "rank-drift"] in drifting["found"]
    assert {code for _, code in drifting["found"]} == {"rank-drift"}
    assert synced["found"] == []
    assert any("broadcasts rank 0's buffers" in n for n in synced["notes"])


def test_a_skipped_optimizer_step_folds_its_micro_batches_into_the_next() -> None:
    """What GradScaler does on an overflow: forward and backward, but no optimizer.step()."""
    torch.manual_seed(0)
    model = Net()
    optimizer = sgd(model)
    data = iter(training.batches(8))
    with bnaudit.watch(model, optimizer, accumulate=2) as w:
        for stepped in (False, True, True):
            for _ in range(2):
                x, y = next(data)
                nn.functional.cross_entropy(model(x), y).backward()
            if stepped:
                optimizer.step()
            optimizer.zero_grad()
    report = w.report()
    assert report.findings == [] and report.steps == 2
    assert report.layer("blocks.0.1").metrics.micro_batches == 6
