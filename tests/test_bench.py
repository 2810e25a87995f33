"""The benchmark's building blocks (benchmarks/): the models are what RESULTS.md says they are,
and the measuring helpers do what they claim. The benchmark itself is run by `make bench`."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_bnaudit_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def count(model: nn.Module, cls: type[nn.Module]) -> int:
    return sum(type(m) is cls for m in model.modules())


def test_models_have_the_layers_the_report_names(bench) -> None:
    models = bench.models
    resnet, mobilenet = models.resnet50_like(), models.mobilenetv2_like()
    assert count(resnet, nn.BatchNorm2d) == 53
    assert count(mobilenet, nn.BatchNorm2d) == 52
    depthwise = [m for m in mobilenet.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels for m in depthwise)
    assert count(models.mlp400(), nn.BatchNorm1d) == 400
    assert count(models.cnn3d(), nn.BatchNorm3d) == 6
    effnet = models.efficientnet_b0_like()
    assert count(effnet, nn.BatchNorm2d) == 16 and count(effnet, models.BatchNormAct2d) == 33
    with torch.no_grad():
        assert models.cnn3d().eval()(torch.randn(2, 3, 4, 16, 16)).shape == (2, 10)


def test_calibrate_gives_running_stats_and_keeps_momentum(bench) -> None:
    model = bench.build("DeepMLP", (8, 64), depth=3)
    bn = bench.models.bn_layers(model)
    assert all(m.momentum == 0.1 and int(m.num_batches_tracked) == 2 for m in bn)
    assert not any(bool((m.running_var == 1).all()) for m in bn)
    assert not model.training


def test_linear_fit(bench) -> None:
    fit = bench.linear_fit([1.0, 2.0, 4.0, 8.0], [3.0, 5.0, 9.0, 17.0])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(1.0)
    assert fit["r2"] == pytest.approx(1.0) and fit["max_dev"] == pytest.approx(0.0, abs=1e-12)
    bent = bench.linear_fit([1.0, 2.0, 4.0, 8.0], [1.0, 4.0, 16.0, 64.0])
    assert bent["r2"] < 0.99 and bent["max_dev"] > 0.1


def test_interleaved_alternates_and_resets_after_the_plain_run(bench) -> None:
    calls: list[str] = []
    runs = [lambda: calls.append("plain"), lambda: calls.append("audit")]
    times = bench.interleaved(runs, 3, reset=lambda: calls.append("reset"))
    assert [len(t) for t in times] == [3, 3]
    warm_up = ["plain", "reset", "audit"]
    forward, backward = ["plain", "reset", "audit"], ["audit", "plain", "reset"]
    assert calls == warm_up + forward + backward + forward


def test_interleaved_resets_after_each_of_the_first_runs(bench) -> None:
    calls: list[str] = []
    runs = [lambda name=name: calls.append(name) for name in ("floor", "plain", "audit")]
    bench.interleaved(runs, 2, reset=lambda: calls.append("reset"), resets=2)
    warm_up = ["floor", "reset", "plain", "reset", "audit"]
    backward = ["audit", "plain", "reset", "floor", "reset"]
    assert calls == warm_up + warm_up + backward


def test_floors_hook_every_bn_layer_of_the_hooked_passes_only(bench) -> None:
    floors = bench.floors
    model = bench.build("DeepMLP", (8, 64), depth=2)
    batches = list(bench.batches_of((8, 64), 3, seed=2))
    layers = bench.models.bn_layers(model)
    measured = []
    real = bench.floors._kernel_hook

    def counting(module):
        hook = real(module)

        def wrapped(m, inputs, output):
            measured.append((m, m.training))
            hook(m, inputs, output)

        return wrapped

    floors._kernel_hook = counting
    try:
        floors.floor_passes(bench, model, batches, "kernel")
    finally:
        floors._kernel_hook = real
    # eval and train mode per batch, each layer; the impact passes take no hook
    assert len(measured) == 2 * len(batches) * len(layers)
    assert sum(t for _, t in measured) == len(batches) * len(layers)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in layers)


def test_the_recalibration_floor_reads_the_moments_of_every_bn_input(bench, monkeypatch) -> None:
    from bnaudit.measure import fused

    model = bench.build("DeepMLP", (8, 64), depth=3)
    layers = bench.models.bn_layers(model)
    seen = []
    real = fused.Prepared.moments
    monkeypatch.setattr(fused.Prepared, "moments", lambda p, x: seen.append(x) or real(p, x))
    with bench.floors.moments_hooked(model), torch.no_grad():
        model.train()(torch.randn(8, 64))
    assert len(seen) == len(layers)
    assert all(not m._forward_pre_hooks for m in layers)


def test_floor_runs_share_the_plain_rounds(bench) -> None:
    model = bench.build("DeepMLP", (8, 64), depth=2)
    batches = list(bench.batches_of((8, 64), 2, seed=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = bench.time_in_process(model, batches, 3, with_floors=True)
    assert set(r.floors) == set(bench.floors.KINDS)
    assert all(len(t) == len(r.timing.plain) == 3 for t in r.floors.values())
    ratios = r.floor_ratios()
    assert all(ratio > 0 for ratio in ratios.values())
    row = bench.floors.row("mlp", r)
    assert len(row) == len(bench.floors.HEADER) and row[-1] == f"**{r.timing.ratio:.2f}**"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every side reset


def test_peak_rss_is_this_process(bench) -> None:
    assert 10 * 1024 < bench.peak_rss_kib() < 64 * 1024 * 1024


def test_plain_side_runs_the_passes_the_audit_reports(bench) -> None:
    model = bench.build("DeepMLP", (8, 64), depth=2)
    batches = list(bench.batches_of((8, 64), 3, seed=2))
    calls = [0]
    handle = model.register_forward_pre_hook(lambda m, i: calls.__setitem__(0, calls[0] + 1))
    try:
        bench.plain_passes(model, batches)
    finally:
        handle.remove()
    report = bench.run_audit(model, batches)  # raises unless it ran needed_passes(3)
    assert calls[0] == report.forward_passes == bench.needed_passes(3)


def test_a_rerun_keeps_the_figures_measured_by_hand(bench, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    assert bench.kept_by_hand(results) == ""  # no file yet
    results.write_text("# bnaudit benchmark\n\ngenerated\n")
    assert bench.kept_by_hand(results) == ""  # nothing by hand
    hand = f"{bench.HAND_MARK}\n## Measured by hand\n\n4.1 GB\n"
    results.write_text("# bnaudit benchmark\n\ngenerated\n\n" + hand)
    assert bench.kept_by_hand(results) == "\n" + hand
    assert bench.kept_by_hand(Path(__file__).parent.parent / "benchmarks" / "RESULTS.md")


def test_parse_size(bench) -> None:
    assert bench.parse_size("200M") == 200 << 20
    assert bench.parse_size("2G") == 2 << 30
    assert bench.parse_size("1.5g") == 3 << 29
    assert bench.parse_size("4096") == 4096


def test_static_runs_the_quick_look_without_a_report(bench) -> None:
    # The targets are for the table alone (no hash); the gate's run writes the report it hashes.
    assert bench.STATIC_RUNS["table (no hash)"] == []
    assert "--json" in bench.STATIC_RUNS["--json (hashed)"]
    assert "--no-hash" not in bench.STATIC_RUNS["--json (hashed)"]


# In a fresh process: in the suite's, freed memory may already be resident (what the peak
# of a new allocation then does not show depends on the tests before).
STAGES_CHILD = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import memory_stages
stages = memory_stages.Stages()
big = torch.ones(64 * 2**20 // 4)  # 64 MiB, resident
del big
stages.mark("with a 64 MiB tensor")
stages.mark("without")
print(json.dumps({"rows": stages.rows, "resets": stages.resets}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/status")
def test_memory_stages_reset_the_peak_between_stages(bench) -> None:
    child = subprocess.run(
        [sys.executable, "-c", STAGES_CHILD, str(BENCH.parent)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    got = json.loads(child.stdout)
    first, second = got["rows"]
    if not got["resets"]:
        pytest.skip("this kernel cannot reset VmHWM (/proc/self/clear_refs)")
    assert first["peak"] >= first["rss"] + 60 > second["peak"] + 50
    text = "\n".join(
        bench.memory_stages.render(bench, (bench.CASES[0],), {bench.CASES[0].name: {
            "stages": got["rows"], "resets": True}})
    )  # fmt: skip
    assert f"| {bench.CASES[0].name} | without | {second['peak']:.0f} |" in text
    assert "not reset between stages" not in text


# --- the shapes users have (benchmarks/shapes.py), both install paths, under contention -----


def test_the_user_shape_models_have_the_layers_they_claim(bench) -> None:
    models = bench.models
    audio, unet, video, crnn = models.audio1d(), models.unet(), models.temporal3d(), models.crnn()
    assert count(audio, nn.BatchNorm1d) == 4
    assert count(unet, nn.BatchNorm2d) == 18
    assert count(video, nn.BatchNorm3d) == 8
    assert count(crnn, nn.BatchNorm2d) == 5 and count(crnn, nn.GRU) == 1
    seen: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].dim())) for m in
             models.bn_layers(audio)]  # fmt: skip
    with torch.no_grad():
        assert audio.eval()(torch.randn(2, 1, 2000)).shape == (2, 35)
        # the skips are concatenated: the first merge sees twice the decoder's channels
        assert unet.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)
        assert unet.merge[0][0].in_channels == 2 * unet.up[0].out_channels
        assert video.eval()(torch.randn(1, 3, 4, 16, 16)).shape == (1, 10)
        assert crnn.eval()(torch.randn(2, 1, 32, 64)).shape[:2] == (2, 16)
    for h in hooks:
        h.remove()
    assert seen == [3] * 4  # BatchNorm1d on [B, C, T]


def test_every_shape_case_names_a_factory_and_a_quick_shape(bench) -> None:
    shapes = bench.shapes
    assert set(shapes.CASES) == set(shapes.QUICK_SHAPES)
    assert {"mobilenetv2-224", "audio1d", "unet", "temporal3d", "crnn"} <= set(shapes.CASES)
    assert {c.name for c in bench.CASES} <= set(shapes.CASES)  # the original five as well
    assert shapes.CASES["mobilenetv2-224"][1] == (32, 3, 224, 224)
    assert all(callable(getattr(bench.models, f)) for f, *_ in shapes.CASES.values())


def test_kernel_switches_the_path_and_puts_the_variable_back(bench, monkeypatch) -> None:
    shapes = bench.shapes
    monkeypatch.setenv(shapes.KERNEL_ENV, "before")
    with shapes.kernel("torch"):
        assert os.environ[shapes.KERNEL_ENV] == "torch"
    with shapes.kernel(""):
        assert shapes.KERNEL_ENV not in os.environ
    assert os.environ[shapes.KERNEL_ENV] == "before"
    monkeypatch.delenv(shapes.KERNEL_ENV)
    with pytest.raises(RuntimeError), shapes.kernel("torch"):
        raise RuntimeError
    assert shapes.KERNEL_ENV not in os.environ


def test_burners_spin_and_are_stopped_even_on_error(bench, monkeypatch) -> None:
    monkeypatch.setattr(bench.shapes, "SETTLE_S", 0.0)
    with pytest.raises(RuntimeError), bench.shapes.burners(1) as procs:
        assert len(procs) == 1 and procs[0].poll() is None  # running
        raise RuntimeError
    assert procs[0].poll() is not None  # stopped and reaped


def test_rounds_alternate_the_order(bench) -> None:
    calls: list[str] = []
    runs = {k: (lambda k=k: calls.append(k)) for k in ("plain", "numba", "torch")}
    times = bench.shapes.rounds(runs, 3)
    assert [len(t) for t in times.values()] == [3, 3, 3]
    forward = ["plain", "numba", "torch"]
    assert calls == forward + forward[::-1] + forward


def test_shape_measurement_runs_both_paths_and_renders_the_targets(bench, monkeypatch) -> None:
    """One tiny case end to end (no burners): both paths take their own route, the model is
    left as it was, and the table marks a missed target in bold."""
    shapes = bench.shapes
    from bnaudit.measure import fused

    monkeypatch.setattr(shapes, "CASES", {"tiny": ("small_cnn", (2, 3, 8, 8), 1, "a small CNN")})
    monkeypatch.setattr(shapes, "BURNERS", 0)
    paths: list[str] = []
    real = fused.kernels
    monkeypatch.setattr(fused, "kernels", lambda: paths.append(os.environ.get(
        shapes.KERNEL_ENV, "")) or real())  # fmt: skip
    got = shapes.measure(bench, "tiny", (2, 3, 8, 8), 1, 2)
    # Quiet rounds also time the exact-kernel floor; the busy ones the three sides alone.
    assert got.layers == 4 and set(got.busy) == set(shapes.SIDES)
    assert set(got.quiet) == {*shapes.SIDES, "kernel"}
    assert all(len(t) == 2 for t in (*got.quiet.values(), *got.busy.values()))
    assert {"", "torch"} <= set(paths)
    slow = dataclasses.replace(
        got, quiet=dict(got.quiet, numba=[t * 9 for t in got.quiet["plain"]])
    )
    text = shapes.render([slow], threads=1, repeats=2)
    assert "| tiny | 1 × 2×3×8×8 | 4 |" in text and "**9.00**" in text
    rest = [a - k for a, k in zip(slow.quiet["numba"], slow.quiet["kernel"], strict=True)]
    assert shapes.rest_s(slow.quiet) == statistics.median(rest)
    assert f"| {1e3 * statistics.median(rest):.0f} |" in text
    assert "≤ 1.25 quiet: 0 of 1 models" in text


def test_sections_are_named_and_timed(bench) -> None:
    assert list(bench.SECTIONS)[:1] == ["shapes"] and all(map(callable, bench.SECTIONS.values()))
    stages = bench.Stages()
    assert stages("one", lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        stages("two", lambda: 1 / 0)
    assert list(stages) == ["one", "two"] and all(v >= 0 for v in stages.values())


def test_quick_mode_from_the_environment(bench, monkeypatch) -> None:
    monkeypatch.setenv("BENCH_QUICK", "1")
    assert bench.parse_args([]).quick
    monkeypatch.setenv("BENCH_QUICK", "0")
    assert not bench.parse_args([]).quick
    assert bench.parse_args(["--section", "shapes"]).section == "shapes"


def test_a_burner_ends_when_its_parent_is_gone(bench) -> None:
    """A burner outlives no benchmark, even one killed before its `finally`."""
    # The parent given is not this process: the burner sees another parent and stops at once.
    child = subprocess.run([sys.executable, "-c", bench.shapes.BURN, "1"], timeout=60, check=True)
    assert child.returncode == 0


def test_the_watch_cost_section_runs_healthy_steps_and_says_its_ratios(bench) -> None:
    import watch_cost  # on the path bench.py put it on

    # The small CNN, not the ResNet-50 layout: the test checks the code path, not the numbers.
    times = watch_cost.measure((4, 3, 16, 16), 2, bench.models.small_cnn)  # raises on a finding
    assert {k: len(v) for k, v in times.items()} == {"plain": 2, "watched": 2, "idle": 2}
    assert all(t > 0 for side in times.values() for t in side)
