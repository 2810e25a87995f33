"""What an audit costs against the forward passes it needs, in time and in memory.

    python benchmarks/bench.py [--threads N] [--repeats R] [--models resnet50,effnet] [--out ...]
    python benchmarks/bench.py --section shapes      # one extra section alone, printed
    BENCH_QUICK=1 python benchmarks/bench.py          # every code path on tiny sizes (--quick)

`make bench` runs it with the defaults (about 20 minutes on 2 CPU cores; RESULTS.md lists the
time of each section). Extra sections live in modules of their own and are listed in SECTIONS.
Everything is generated here: models with random weights and calibrated running statistics
(benchmarks/models.py), seeded batches, a checkpoint and a data file in a temporary folder;
only the timings vary between runs.

Time is always a ratio measured in one process, on the same batches and threads, with the plain
passes and the audit interleaved (plain, hooks, audit, then audit, hooks, plain, ...) so that
drift in the machine's speed hits every side; medians over the repeats. The plain passes are
what the audit must run anyway: per batch one eval-mode forward and one forward with the BN
layers in train mode, plus the output-impact check's eval-mode forward per batch, under
torch.no_grad, without hooks. Peak memory (RSS) is measured in a
fresh process per measurement, since a process's peak never goes down.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import importlib
import io
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This checkout's bnaudit and the models next to this file, whatever is installed elsewhere.
sys.path[:0] = [str(ROOT), str(HERE)]

import artifact_cost  # noqa: E402
import costs  # noqa: E402  (needs the path above)
import floors  # noqa: E402
import memory_stages  # noqa: E402
import models  # noqa: E402
import shapes  # noqa: E402
import watch_cost  # noqa: E402
from timing import timed  # noqa: E402

TARGET_TIME = 1.25  # audit / plain passes
TARGET_RSS = 1.3  # audit / plain eval forward


@dataclass(frozen=True)
class Case:
    name: str
    factory: str  # a function of benchmarks/models.py
    shape: tuple[int, ...]  # one batch
    batches: int
    what: str


# Sized so that `make bench` takes a few minutes on 2 CPU cores: images of 112×112 rather than
# 160×160. The ratios hardly depend on the image size, since the convolutions and the audit's
# work both grow with H·W (RESULTS.md shows the cost per BN value).
CASES = (
    Case("resnet50", "resnet50_like", (16, 3, 112, 112), 3, "ResNet-50 layout, 53 BatchNorm2d"),
    Case(
        "mobilenetv2",
        "mobilenetv2_like",
        (16, 3, 112, 112),
        3,
        "MobileNetV2 layout (depthwise convs), 52 BatchNorm2d",
    ),
    Case("mlp400", "mlp400", (64, 64), 8, "400 × (Linear 64 → BatchNorm1d → ReLU)"),
    Case("cnn3d", "cnn3d", (4, 3, 16, 64, 64), 3, "6 × (Conv3d → BatchNorm3d → ReLU)"),
    Case(
        "effnet",
        "efficientnet_b0_like",
        (16, 3, 112, 112),
        3,
        "EfficientNet-B0 layout, 49 BatchNorm2d, 33 of them timm-style BatchNormAct2d (+ SiLU)",
    ),
)
QUICK_SHAPES = {  # --quick: every code path in about a minute, numbers meaningless
    "resnet50": (2, 3, 32, 32),
    "mobilenetv2": (2, 3, 32, 32),
    "mlp400": (8, 64),
    "cnn3d": (2, 3, 4, 16, 16),
    "effnet": (2, 3, 32, 32),
}
GROWTH_CASE = "mobilenetv2"  # time and memory against the number of batches...
GROWTH_SHAPE = (16, 3, 64, 64)  # ...on smaller images: 15 batches, each side several times
GROWTH_BATCHES = (1, 2, 4, 8)
DEPTHS = (50, 200, 800)  # the MLP's number of BN layers (3 points: make bench's 20 minutes)
DEPTH_BATCHES = 4


# --- data and models ------------------------------------------------------------------------


def batches_of(shape: tuple[int, ...], count: int, seed: int) -> Iterator[Tensor]:
    """Seeded N(0, 1) batches, made one at a time (memory does not grow with the count)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(shape, generator=gen)


def build(factory: str, shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(models, factory)(**kwargs)
    return models.calibrate(model, batches_of(shape, 2, seed=1))


def plain_passes(model: nn.Module, batches: list[Tensor]) -> None:
    """The passes an audit needs, without hooks: per batch one eval-mode forward and one with the
    BN layers in train mode, then the output-impact check's one eval-mode forward per batch."""
    probed_passes(model, batches)
    impact_passes(model, batches)


def probed_passes(model: nn.Module, batches: list[Tensor]) -> None:
    """The passes the audit hooks: per batch one eval-mode forward and one with the BN layers in
    train mode."""
    layers = models.bn_layers(model)
    with torch.no_grad():
        for x in batches:
            model.eval()
            model(x)
            for m in layers:
                m.training = True
            model(x)


def impact_passes(model: nn.Module, batches: list[Tensor]) -> None:
    """What the output-impact check runs: eval mode, one forward per batch (other statistics)."""
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)


def needed_passes(batches: int) -> int:
    return 3 * batches


def run_audit(model: nn.Module, batches: list[Tensor]) -> Any:
    import bnaudit

    report = bnaudit.audit(model, batches)
    want = needed_passes(len(batches))
    if report.batches != len(batches) or report.forward_passes != want:
        raise RuntimeError(f"the audit ran {report.forward_passes} passes, not {want}")
    return report


def run_hooked_passes(model: nn.Module, batches: list[Tensor]) -> None:
    """The audit's passes with its hooks, and the impact's passes, without the rest (metrics,
    findings, recalibrated statistics)."""
    passes = importlib.import_module("bnaudit.measure.passes")
    check = importlib.import_module("bnaudit.check.audit")
    passes.run_passes(model, batches, check.AuditOptions(impact=False, fold=False))
    impact_passes(model, batches)


def bn_values(model: nn.Module, x: Tensor) -> int:
    """How many values the BN layers see in one forward pass of `x`."""
    seen = [0]

    def count(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        seen[0] += inputs[0].numel()

    handles = [m.register_forward_hook(count) for m in models.bn_layers(model)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return seen[0]


# --- measuring ------------------------------------------------------------------------------


def interleaved(
    runs: list[Callable[[], object]],
    repeats: int,
    reset: Callable[[], None],
    resets: int = 1,
) -> list[list[float]]:
    """Seconds of each run, in alternating order, after one warm-up of each.

    `reset` runs, untimed, after each of the first `resets` runs (the plain passes, say) to put
    back what they changed.
    """
    for i, run in enumerate(runs):
        run()
        if i < resets:
            reset()
    times: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for repeat in range(repeats):
        for j in order if repeat % 2 == 0 else order[::-1]:
            times[j].append(timed(runs[j]))
            if j < resets:
                reset()
    return times


@dataclass(frozen=True)
class Timing:
    """Seconds of the plain side and of the audit side, run by run (same order)."""

    plain: list[float]
    audit: list[float]

    @property
    def ratios(self) -> list[float]:
        return [a / p for p, a in zip(self.plain, self.audit, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def cells(self) -> list[str]:
        return [
            f"{statistics.median(self.plain):.3f}",
            f"{statistics.median(self.audit):.3f}",
            f"**{self.ratio:.2f}**",
            f"{min(self.ratios):.2f}–{max(self.ratios):.2f}",
        ]


@dataclass(frozen=True)
class InProcess:
    timing: Timing  # plain passes against the whole audit
    hooked: list[float]  # the audit's passes with hooks, without metrics and findings
    values: int  # BN values per forward pass
    batches: int
    floors: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # floors.KINDS

    def floor_ratios(self) -> dict[str, float]:
        """Each floor's median ratio to the plain passes of the same rounds."""
        return {
            kind: statistics.median(f / p for p, f in zip(self.timing.plain, t, strict=True))
            for kind, t in self.floors.items()
        }

    def hooked_ratio(self) -> float:
        pairs = zip(self.timing.plain, self.hooked, strict=True)
        return statistics.median(h / p for p, h in pairs)

    def per_value_ns(self) -> tuple[float, float, float]:
        """ns per BN value: of a forward pass, of the hooks on a hooked pass (hooked − plain),
        after the passes (audit − hooked, per needed pass)."""
        plain = statistics.median(self.timing.plain)
        hooked = statistics.median(self.hooked)
        audit = statistics.median(self.timing.audit)
        per_pass = 1e9 / (self.values * needed_passes(self.batches))
        per_hooked = 1e9 / (self.values * 2 * self.batches)  # the hooks see 2 passes a batch
        return plain * per_pass, (hooked - plain) * per_hooked, (audit - hooked) * per_pass


def time_in_process(
    model: nn.Module, batches: list[Tensor], repeats: int, with_floors: bool = False
) -> InProcess:
    """The plain passes, the audit's hooked passes and the whole audit, interleaved; with
    `with_floors`, also the plain passes under each of `floors.KINDS`' hooks."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = floors.KINDS if with_floors else ()
    # The unhooked train-mode passes move the running stats: put back after each, untimed (the
    # floors first, then the plain passes); the audit restores them itself.
    runs: list[Callable[[], object]] = [
        *(lambda k=k: floors.floor_passes(sys.modules[__name__], model, batches, k) for k in kinds),
        lambda: plain_passes(model, batches),
        lambda: run_hooked_passes(model, batches),
        lambda: run_audit(model, batches),
    ]
    *timed_floors, plain, hooked, audit = interleaved(
        runs, repeats, reset=lambda: model.load_state_dict(state), resets=len(kinds) + 1
    )
    return InProcess(
        Timing(plain, audit),
        hooked,
        bn_values(model, batches[0]),
        len(batches),
        dict(zip(kinds, timed_floors, strict=True)),
    )


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run a whole process from the repository root: (wall seconds, stdout)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def check_command(case: Case, folder: Path) -> list[str]:
    ckpt, data = folder / f"{case.name}.pt", folder / f"{case.name}-data.pt"
    spec = f"{HERE / 'models.py'}:{case.factory}"
    cmd = [sys.executable, "-m", "bnaudit", "check", str(ckpt), "--model", spec]
    return [*cmd, "--data", str(data), "--fail-on", "never"]


def time_processes(case: Case, folder: Path, env: dict[str, str], repeats: int) -> Timing:
    """`python -m bnaudit check` against a process that loads the same files, plain passes."""
    ckpt, data = folder / f"{case.name}.pt", folder / f"{case.name}-data.pt"
    plain = [sys.executable, str(Path(__file__).resolve()), "_plain", case.factory]
    plain += [str(ckpt), str(data)]
    check = check_command(case, folder)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            times[j].append(run_child((plain, check)[j], env)[0])
    return Timing(*times)


def peak_rss(
    case: Case,
    folder: Path,
    env: dict[str, str],
    mode: str,
    batches: int,
    shape: tuple[int, ...] | None = None,
) -> float:
    """Peak RSS (MiB) of a fresh process: `idle` (model loaded), `plain` (+ one eval forward of
    one batch), `passes` (+ the audit's forward passes without hooks, `plain_passes`), `floor`
    (+ numba's kernels loaded and run once, then those passes) or `audit` (+ an audit of
    `batches` batches, made one at a time)."""
    dims = "x".join(map(str, shape or case.shape))
    cmd = [sys.executable, str(Path(__file__).resolve()), "_rss", case.factory]
    cmd += [str(folder / f"{case.name}.pt"), dims, mode, str(batches)]
    return json.loads(run_child(cmd, env)[1])["peak_mib"]


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares y = a + b·x: slope, intercept, R², and the largest residual as a fraction
    of the largest fitted value (a fraction of each point's own value would blow up near 0)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    fitted = [intercept + slope * x for x in xs]
    ss_res = sum((y - f) ** 2 for y, f in zip(ys, fitted, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {
        "slope": slope,
        "intercept": intercept,
        "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
        "max_dev": max(abs(y - f) for y, f in zip(ys, fitted, strict=True))
        / max(abs(f) for f in fitted),
    }


def profile_audit(model: nn.Module, batches: list[Tensor], top: int = 12) -> list[list[str]]:
    """cProfile of one audit: the functions and torch ops with the most own time."""
    run_audit(model, batches)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    run_audit(model, batches)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO()).stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in stats.values())
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    out = []
    for (path, line, name), (_, calls, own, _, _) in rows:
        where = name if path == "~" else f"{Path(path).name}:{line} {name}"
        out.append([f"`{where}`", str(calls), f"{own:.3f}", f"{100 * own / total:.0f} %"])
    return out


def growth_with_batches(
    case: Case, folder: Path, env: dict[str, str], repeats: int
) -> dict[str, Any]:
    model = build(case.factory, case.shape)
    rows, plain_s, audit_s, rss = [], [], [], []
    for k in GROWTH_BATCHES:
        batches = list(batches_of(case.shape, k, seed=2))
        t = time_in_process(model, batches, repeats).timing
        plain_s.append(statistics.median(t.plain))
        audit_s.append(statistics.median(t.audit))
        rss.append(peak_rss(case, folder, env, "audit", k, case.shape))
        rows.append([str(k), *t.cells()[:3], f"{rss[-1]:.0f}"])
    ks = [float(k) for k in GROWTH_BATCHES]
    return {
        "rows": rows,
        "plain": linear_fit(ks, plain_s),
        "audit": linear_fit(ks, audit_s),
        "rss": linear_fit(ks, rss),
        "rss_values": rss,
    }


def growth_with_depth(shape: tuple[int, ...], repeats: int, depths: tuple[int, ...]) -> dict:
    rows, plain_s, audit_s, ratios = [], [], [], []
    for depth in depths:
        model = build("DeepMLP", shape, depth=depth)
        batches = list(batches_of(shape, DEPTH_BATCHES, seed=2))
        t = time_in_process(model, batches, repeats).timing
        plain_s.append(statistics.median(t.plain))
        audit_s.append(statistics.median(t.audit))
        ratios.append(t.ratio)
        rows.append([str(depth), *t.cells()[:3]])
    ds = [float(d) for d in depths]
    return {
        "rows": rows,
        "ratios": ratios,
        "plain": linear_fit(ds, plain_s),
        "audit": linear_fit(ds, audit_s),
    }


STATIC_BYTES = 2 * 1024**3
QUICK_STATIC_BYTES = 64 * 1024**2
STATIC_OVER_IMPORT_S = 0.5  # the static audit's target: `import torch` + this, same rounds
STATIC_RSS_MIB = 300.0
# Runs `python -m bnaudit` as a process of its own and writes its peak RSS (VmHWM) to stderr at
# exit: the benchmark's own memory must not count, and ru_maxrss would carry it over the fork.
PEAK_AT_EXIT = """\
import atexit, runpy, sys
def peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            sys.stderr.write('\\nVmHWM ' + line.split()[1] + '\\n')
atexit.register(peak)
sys.argv = ['bnaudit', *sys.argv[1:]]
runpy.run_module('bnaudit', run_name='__main__')
"""


def write_big_checkpoint(path: Path, size: int) -> int:
    """A ResNet-like state dict of `size` bytes: 512×512×3×3 convs, each with a BatchNorm2d."""
    state: dict[str, Tensor] = {}
    gen = torch.Generator().manual_seed(3)
    total, i = 0, 0
    while total < size:
        state[f"layer{i}.conv.weight"] = torch.randn(512, 512, 3, 3, generator=gen)
        bn = nn.BatchNorm2d(512)
        bn.running_mean.normal_(0, 0.1, generator=gen)
        bn.running_var.uniform_(0.5, 1.5, generator=gen)
        bn.num_batches_tracked.fill_(1000)
        state.update({f"layer{i}.bn.{k}": v for k, v in bn.state_dict().items()})
        total += 512 * 512 * 9 * 4
        i += 1
    torch.save(state, path)
    return i


# The static audit's runs: what each adds to `check big.pt`, and whether it hashes the file.
# The table alone is the quick look the targets are for; a report file is what a CI gate writes.
IMPORT_FLOOR = "floor: `import torch` alone"
CLI_FLOOR = "`import torch, bnaudit.cli` (no file read)"
STATIC_RUNS = {
    "table (no hash)": [],
    "--json (hashed)": ["--json", "{folder}/report.json"],
    "--json --no-hash": ["--json", "{folder}/report.json", "--no-hash"],
}


def static_audit(
    folder: Path, env: dict[str, str], repeats: int, size: int = STATIC_BYTES
) -> dict[str, Any]:
    """`bnaudit check big.pt` without --model on a generated checkpoint of `size` bytes, per run
    of STATIC_RUNS: wall and CPU time of the whole process (Python start and imports included)
    and its peak RSS. The runs interleave, so the page cache and the machine's drift hit each."""
    ckpt = folder / "big.pt"
    layers = write_big_checkpoint(ckpt, size)
    base = [sys.executable, "-c", PEAK_AT_EXIT, "check", str(ckpt), "--fail-on", "never"]
    runs = {k: [*base, *(a.format(folder=folder) for a in v)] for k, v in STATIC_RUNS.items()}
    # The floor of any static audit that imports torch: Python's start and that import; then
    # bnaudit's command line imported too, without reading a file.
    at_exit = PEAK_AT_EXIT.split("sys.argv")[0]
    runs[IMPORT_FLOOR] = [sys.executable, "-c", at_exit + "import torch"]
    runs[CLI_FLOOR] = [sys.executable, "-c", at_exit + "import torch, bnaudit.cli"]
    measured: dict[str, dict[str, list[float]]] = {
        k: {"wall": [], "cpu": [], "peak": []} for k in runs
    }
    found = set()
    for i in range(repeats + 1):  # the first round reads the file into the page cache: not kept
        for name in runs if i % 2 == 0 else list(runs)[::-1]:
            wall, cpu, peak = _static_run(runs[name], env)
            if i > 0:
                for key, value in (("wall", wall), ("cpu", cpu), ("peak", peak)):
                    measured[name][key].append(value)
        found.add(json.loads((folder / "report.json").read_text())["summary"]["layers"])
    if found != {layers}:
        raise RuntimeError(f"the static audit found {sorted(found)} BN layers, not {layers}")
    size = ckpt.stat().st_size
    ckpt.unlink()
    return {
        "size": size,
        "layers": layers,
        "runs": {
            name: {
                "seconds": statistics.median(m["wall"]),
                "times": m["wall"],
                "cpu_s": statistics.median(m["cpu"]),
                "peak_mib": max(m["peak"]),
            }
            for name, m in measured.items()
        },
    }


def _static_run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """One process: wall seconds, CPU seconds (user + system, every thread), peak RSS in MiB.

    The CPU time is the difference of getrusage(RUSAGE_CHILDREN) around it (this benchmark
    runs one child at a time). Its ru_maxrss is not used: Linux carries the forking process's
    high-water mark over exec, so it would be at least this benchmark's own peak; the child
    reports its VmHWM at exit instead (PEAK_AT_EXIT).
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"static audit exited {done.returncode}:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, int(done.stderr.rsplit("VmHWM ", 1)[1].split()[0]) / 1024


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def static_text(r: dict[str, Any]) -> str:
    rows = []
    limit = r["runs"][IMPORT_FLOOR]["seconds"] + STATIC_OVER_IMPORT_S
    for name, run in r["runs"].items():
        floor = name in (IMPORT_FLOOR, CLI_FLOOR)
        rows.append(
            [
                name,
                f"**{run['seconds']:.2f}**",
                ", ".join(f"{t:.2f}" for t in run["times"]),
                f"{run['cpu_s']:.2f}",
                f"**{run['peak_mib']:.0f}**",
                "" if floor else f"≤ {limit:.2f} s: {_met(run['seconds'] <= limit)}",
                ""
                if floor
                else f"< {STATIC_RSS_MIB:.0f} MiB: {_met(run['peak_mib'] < STATIC_RSS_MIB)}",
            ]
        )
    return "\n".join(
        [
            f"`python -m bnaudit check big.pt` without `--model` on a generated checkpoint of "
            f"{r['size'] / 2**30:.2f} GiB ({r['layers']} conv weights of 512×512×3×3, each with "
            "a BatchNorm2d): a whole process, Python start and imports included, "
            f"{len(next(iter(r['runs'].values()))['times'])} runs of each, interleaved, after a "
            "round that reads the file into the page cache. The table alone does not hash the "
            "file (docs/static-audit.md, Provenance); a report file does, unless --no-hash. "
            "CPU time counts every thread (the hash runs on one beside torch's import). The "
            "floor: a process that only imports torch, as every static audit must (the file's "
            "pickle names torch's storage types); then one that imports bnaudit's command line "
            "as well, without reading a file: in the same rounds.",
            "",
            table(
                [
                    "run",
                    "median s",
                    "runs s",
                    "CPU s",
                    "peak RSS MiB",
                    f"time target: `import torch` + {STATIC_OVER_IMPORT_S} s",
                    "memory target",
                ],
                rows,
            ),
        ]
    )


def parse_size(text: str) -> int:
    """`2G`, `200M`, `1.5G` or a number of bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


# --- the report -----------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine(threads: int) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch "
        f"{torch.__version__}; {threads} torch threads (child processes: OMP_NUM_THREADS="
        f"{threads}); load average at the start {load}; {now:%Y-%m-%d %H:%M} UTC"
    )


def met(value: float, target: float) -> str:
    return f"{value:.2f} (met)" if value <= target else f"{value:.2f} (**not met**)"


def fit_line(name: str, fit: dict[str, float], unit: str) -> str:
    return (
        f"{name}: slope {fit['slope']:.4g} {unit}, intercept {fit['intercept']:.3g}, "
        f"R² {fit['r2']:.4f}, largest residual {100 * fit['max_dev']:.1f} % of the largest value"
    )


@dataclass
class Results:
    head: str
    cases: tuple[Case, ...]
    inproc: dict[str, InProcess]
    procs: dict[str, Timing]
    rss: dict[str, dict[str, float]]
    profiles: dict[str, list[list[str]]]
    growth: Case
    by_batches: dict[str, Any]
    by_depth: dict[str, Any]
    static: dict[str, Any]
    command: str
    elapsed: float = 0.0
    costs: list[str] = dataclasses.field(default_factory=list)  # costs.render's sections
    memory: list[str] = dataclasses.field(default_factory=list)  # memory_stages.render's
    extra: list[str] = dataclasses.field(default_factory=list)  # SECTIONS' markdown
    stages: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per stage

    def render(self) -> str:
        cases = self.cases
        summary = [
            [
                c.name,
                met(self.inproc[c.name].timing.ratio, TARGET_TIME),
                met(self.procs[c.name].ratio, TARGET_TIME),
                met(self.rss[c.name]["audit"] / self.rss[c.name]["plain"], TARGET_RSS),
            ]
            for c in cases
        ]
        time_rows = []
        cost_rows = []
        for c in cases:
            r = self.inproc[c.name]
            forward, hooks, after = r.per_value_ns()
            time_rows.append([c.name, f"{c.batches} × {_dims(c.shape)}", *r.timing.cells()])
            cost_rows.append(
                [
                    c.name,
                    f"{r.values / 1e6:.2f} M",
                    f"{forward:.1f}",
                    f"{hooks:.1f}",
                    f"{after:.1f}",
                    f"{hooks / forward:.2f}",
                ]
            )
        rss_rows = [rss_row(c.name, self.rss[c.name], c.batches) for c in cases]
        g = self.growth
        parts = [
            "# bnaudit benchmark",
            "",
            "Generated by `make bench` (`benchmarks/bench.py`); do not edit by hand.",
            "",
            f"Machine: {self.head}. The whole run took {self.elapsed:.0f} s.",
            "",
            "## Summary against the targets",
            "",
            f"Targets: audit time ≤ {TARGET_TIME} × the plain passes it needs; peak RSS ≤ "
            f"{TARGET_RSS} × a plain eval forward of the same model and batch; no growth with "
            "the number of batches.",
            "",
            table(
                [
                    "model",
                    "time: audit / plain passes",
                    "time: `bnaudit check` / plain process",
                    "peak RSS: audit / plain eval forward",
                ],
                summary,
            ),
            "",
            "## Models and inputs",
            "",
            table(
                ["model", "what", "batch", "batches"],
                [[c.name, c.what, _dims(c.shape), str(c.batches)] for c in cases],
            ),
            "",
            "Random weights, running statistics calibrated on two batches (a cumulative "
            "average), seeded N(0, 1) batches. An audit makes 3 forward passes per batch: "
            "eval mode and BN train mode with its hooks, then eval mode with the recalibrated "
            "statistics (the output-impact check). The fold check rides on the first eval "
            f"pass ({_samples(importlib.import_module('bnaudit.measure.fold').FOLD_SAMPLES)}).",
            "",
            "## Time, in one process",
            "",
            "`bnaudit.audit(model, batches)` with its defaults against the same passes without "
            "hooks (per batch one eval and one BN-train-mode forward, then one eval forward, "
            "`torch.no_grad`), interleaved; median of the runs and the range of the per-run "
            "ratios. Every timed run in this file's one-process tables is timed as `timeit` "
            "times one: Python's cycle collector run before it and off during it "
            "(`benchmarks/timing.py`).",
            "",
            table(
                ["model", "batches × shape", "plain passes s", "audit s", "audit / plain", "range"],
                time_rows,
            ),
            "",
            "### The cost per BN value",
            "",
            "The same runs, per value a BN layer sees (batch × channels × spatial, summed over "
            "the layers): a forward pass; what the hooks add to each of the 2 hooked passes "
            "(`bnaudit.measure.passes.run_passes` and the impact passes, minus the plain passes); "
            "and what comes after the passes, per needed pass (statistics, folds, metrics, "
            "findings: per layer, not per value, shown per value for comparison). The ratio "
            "is about 1 + (2/3)·hooks/forward + after/forward.",
            "",
            table(
                [
                    "model",
                    "BN values per pass",
                    "forward ns/value",
                    "hooks ns/value",
                    "after the passes ns/value",
                    "hooks / forward",
                ],
                cost_rows,
            ),
            "",
            "### Where the ratio goes: the measured floors",
            "",
            "The same rounds also time the plain passes with hooks that do less than the "
            "audit's, on the eval- and train-mode pass of each batch as the audit's "
            "(`benchmarks/floors.py`): empty hooks (torch's hook dispatch, the floor under any "
            "hook); hooks that read x and y once (a torch sum of each: the memory traffic); "
            "hooks that run the audit's exact kernel on x and y and nothing else (the floor of "
            "the exact measurement, without the audit's bookkeeping). Then the audit's own "
            "hooked passes (`run_passes` without the fold check, and the impact passes) and "
            "the whole audit (plus the fold check, the metrics, the findings and the impact "
            "comparison). Each a median of the per-round ratios to the plain passes.",
            "",
            table(floors.HEADER, [floors.row(c.name, self.inproc[c.name]) for c in cases]),
            "",
            "## Time, whole processes",
            "",
            "`python -m bnaudit check` (load the checkpoint and the data, audit, render the "
            "table) against a process that imports torch, loads the same files and runs the "
            "plain passes. Both start Python and import torch: that fixed cost is in both.",
            "",
            table(
                ["model", "plain process s", "`bnaudit check` s", "ratio", "range"],
                [[c.name, *self.procs[c.name].cells()] for c in cases],
            ),
            "",
            f"Command, for the first model: `{self.command}`.",
            "",
            "## Peak memory (RSS), a fresh process per measurement",
            "",
            "`idle`: Python, torch and the model loaded. `plain`: plus one eval forward of one "
            "batch under `torch.no_grad`. `plain passes`: instead, the forward passes the audit "
            "makes, without hooks (per batch eval and train mode, then eval again). `floor`: "
            "those passes in a process that has loaded numba's kernels and run each once "
            "(LLVM's code and heap, which an audit with the kernels cannot go under). `audit`: "
            "plus `bnaudit.audit` on the batches, made one at a time. Peak = VmHWM of the "
            "process.",
            "",
            table(
                RSS_HEADER,
                rss_rows,
            ),
            "",
            *self.memory,
            f"## Growth with the number of batches ({g.name}, {_dims(g.shape)})",
            "",
            table(
                ["batches", "plain s", "audit s", "audit / plain", "audit peak RSS MiB"],
                self.by_batches["rows"],
            ),
            "",
            "- " + fit_line("plain passes", self.by_batches["plain"], "s per batch"),
            "- " + fit_line("audit", self.by_batches["audit"], "s per batch"),
            "- " + fit_line("audit peak RSS", self.by_batches["rss"], "MiB per batch"),
            f"- audit peak RSS from {min(self.by_batches['rss_values']):.0f} to "
            f"{max(self.by_batches['rss_values']):.0f} MiB over {GROWTH_BATCHES[0]} to "
            f"{GROWTH_BATCHES[-1]} batches",
            "",
            f"## Growth with the number of BN layers (MLP, {DEPTH_BATCHES} batches)",
            "",
            table(["BN layers", "plain s", "audit s", "audit / plain"], self.by_depth["rows"]),
            "",
            "- " + fit_line("plain passes", self.by_depth["plain"], "s per layer"),
            "- " + fit_line("audit", self.by_depth["audit"], "s per layer"),
            "- audit / plain from "
            + " to ".join(_spread(self.by_depth["ratios"]))
            + " across the depths",
            "",
            *self.costs,
            *self.extra,
            "## Static audit of a 2 GB checkpoint",
            "",
            static_text(self.static),
            "",
            "## How long each part of this benchmark took",
            "",
            table(["part", "s"], [[k, f"{v:.0f}"] for k, v in self.stages.items()]),
            "",
            "## Where the audit's time goes",
            "",
            WHERE_THE_TIME_GOES,
            "",
            "cProfile of one audit of all the batches per model: the functions and torch ops "
            "with the most own time. The forward's own ops (`conv2d`, `batch_norm`, `linear`, "
            "...) are the plain passes; the rest is the audit's. cProfile adds to every Python "
            "call, so it overstates the Python share on the MLP.",
            "",
        ]
        for c in cases:
            parts += [
                f"### {c.name}",
                "",
                table(["function", "calls", "own s", "share"], self.profiles[c.name]),
                "",
            ]
        return "\n".join(parts)


WHERE_THE_TIME_GOES = """\
Per BN call, one numba kernel (`bnaudit/fused_kernels.py`) reads x and y once: the float64
batch mean and M2 per channel (two passes over each channel while it is in cache, compensated
block sums), then the reconstruction error and its ratio to the tolerance, about 1 ns per
value on one core against 0.5 (eval) to 2.2 (train) ns for BN itself. Calls with NaN/Inf or
that miss the formula are measured again on float64 copies and diagnosed. timm-style
BatchNormAct layers are read at the input of their `drop`/`act` child, where the
normalisation happens, so they take the same kernel (before, every call of theirs was
diagnosed on float64 copies: 16.6× on the EfficientNet layout). Small activations (at most
32 Ki values: the MLP) are copied in the hook and measured side by side after each pass
(`bnaudit/grouped.py`). Each call's per-channel results are kept and folded into the
accumulators a block at a time (`bnaudit/rows.py`), not with a few dozen tensor operations
per call.

So the ratio is about 1 + (2/3)·(hooks ns/value)/(forward ns/value) plus the work after the
passes. The floor is reading x and y once more per call, so the ratio is near 1.03–1.06 where
BN is a small share of the forward (ResNet's convolutions) and higher where BN's share is large
(MobileNet's depthwise convolutions, a 64-wide Linear). There is also a fixed Python cost per
hook call (hook dispatch, the copy-back of the buffers, the kernel call: tens of µs), which
dominates on tiny batches (the 2,000-batch row). `torch.compile` was tried: no faster, and
20–25 s of compilation in every process. After the passes there are a few dozen small tensor
operations per layer (metrics, findings). Memory: per-channel accumulators, the kept rows
(at most 1 Mi values per layer), and the copies of small activations (at most 4 Mi values), so
the peak does not grow with the batches or the activation size."""


def _spread(values: list[float]) -> list[str]:
    return [f"{min(values):.2f}", f"{max(values):.2f}"]


def _samples(count: int) -> str:
    return "its first sample" if count == 1 else f"its first {count} samples"


def _dims(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


# Figures measured by hand live at the end of RESULTS.md, below this line, and survive a rerun.
HAND_MARK = "<!-- measured by hand: make bench keeps everything below this line -->"


def kept_by_hand(path: Path) -> str:
    """The hand-measured part of an existing RESULTS.md (from HAND_MARK on), else ""."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    at = text.find(HAND_MARK)
    return "\n" + text[at:] if at >= 0 else ""


@dataclass(frozen=True)
class Context:
    """What an extra section (SECTIONS) gets: this module, a temporary folder for its files,
    the child processes' environment, the threads, the repeats, whether --quick, and `log`."""

    bench: Any
    folder: Path
    env: dict[str, str]
    threads: int
    repeats: int
    quick: bool
    log: Callable[[str], None]


# Extra sections, by name: each a callable (Context) -> markdown, written to RESULTS.md after
# the built-in sections in this order; `--section NAME` runs one alone. A new section is one line.
SECTIONS: dict[str, Callable[[Context], str]] = {
    "shapes": shapes.section,
    "artifact_cost": lambda ctx: artifact_cost.section(ctx.quick),
    "watch_cost": lambda ctx: watch_cost.section(ctx.quick, ctx.repeats),
}


class Stages(dict):
    """Seconds per part of the run, in the order they ran (RESULTS.md shows them)."""

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        log(name)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side")
    parser.add_argument(
        "--process-repeats",
        type=int,
        default=1,
        help="runs of each whole process (the static audit: at least 2) [default: %(default)s]",
    )
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
        help="tiny sizes: a smoke run (also BENCH_QUICK=1)",
    )
    parser.add_argument(
        "--models",
        default=",".join(c.name for c in CASES),
        help="comma-separated models to run [default: all: %(default)s]",
    )
    parser.add_argument(
        "--static-size",
        type=parse_size,
        default=None,
        help="size of the static audit's generated checkpoint (200M, 2G) [default: 2G, "
        "--quick: 64M]",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="run only the peak-memory measurements of --models and print them (RESULTS.md is "
        "left alone)",
    )
    parser.add_argument(
        "--static-only",
        action="store_true",
        help="run only the static audit and print its section (RESULTS.md is left alone)",
    )
    parser.add_argument(
        "--section",
        choices=list(SECTIONS),
        help="run only this extra section and print it (RESULTS.md is left alone)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {args.models}")
    args.names = names
    if args.static_size is None:
        args.static_size = QUICK_STATIC_BYTES if args.quick else STATIC_BYTES
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = child_env(args.threads)
    if args.static_only or args.section:
        with tempfile.TemporaryDirectory(prefix="bnaudit-bench-") as tmp:
            if args.static_only:
                print(
                    static_text(
                        static_audit(Path(tmp), env, args.process_repeats, args.static_size)
                    )
                )
            else:
                ctx = Context(
                    sys.modules[__name__],
                    Path(tmp),
                    env,
                    args.threads,
                    args.repeats,
                    args.quick,
                    log,
                )
                print(SECTIONS[args.section](ctx))
        return
    every, depths = CASES, DEPTHS
    if args.quick:
        every = tuple(Case(c.name, c.factory, QUICK_SHAPES[c.name], 2, c.what) for c in CASES)
        depths = DEPTHS[:2]
    cases = tuple(c for c in every if c.name in args.names)
    if args.memory_only:
        print("\n".join(memory_only(cases, env)))
        return
    kept = kept_by_hand(args.out)  # read first: the run rewrites the file
    started = time.perf_counter()
    head = machine(args.threads)
    with tempfile.TemporaryDirectory(prefix="bnaudit-bench-") as tmp:
        results = run_all(args, cases, every, depths, Path(tmp), env, head)
    results.elapsed = time.perf_counter() - started
    args.out.write_text(results.render() + "\n" + kept)
    log(f"wrote {args.out} in {results.elapsed:.0f} s")


def run_all(
    args: argparse.Namespace,
    cases: tuple[Case, ...],
    every: tuple[Case, ...],
    depths: tuple[int, ...],
    folder: Path,
    env: dict[str, str],
    head: str,
) -> Results:
    """Every built-in part, then SECTIONS, each timed (`Stages`)."""
    me = sys.modules[__name__]
    stage = Stages()
    inproc, procs, rss, profiles = {}, {}, {}, {}
    for case in cases:
        model = stage(f"{case.name}: build", lambda c=case: build(c.factory, c.shape))
        batches = list(batches_of(case.shape, case.batches, seed=2))
        torch.save(model.state_dict(), folder / f"{case.name}.pt")
        torch.save(batches, folder / f"{case.name}-data.pt")
        inproc[case.name] = stage(
            f"{case.name}: time in one process",
            lambda m=model, b=batches: time_in_process(m, b, args.repeats, with_floors=True),
        )
        procs[case.name] = stage(
            f"{case.name}: whole processes",
            lambda c=case: time_processes(c, folder, env, args.process_repeats),
        )
        rss[case.name] = stage(
            f"{case.name}: peak memory", lambda c=case: peak_memory(c, folder, env)
        )
        profiles[case.name] = stage(
            f"{case.name}: profile", lambda m=model, b=batches: profile_audit(m, b)
        )
    growth = next(c for c in every if c.name == GROWTH_CASE)
    if not args.quick:
        growth = Case(growth.name, growth.factory, GROWTH_SHAPE, growth.batches, growth.what)
    some = max(3, args.repeats // 2)
    by_batches = stage(
        "growth with batches", lambda: growth_with_batches(growth, folder, env, some)
    )
    mlp_shape = next(c.shape for c in every if c.name == "mlp400")
    by_depth = stage("growth with depth", lambda: growth_with_depth(mlp_shape, some, depths))
    recal = stage(
        "recalibration against update_bn",
        lambda: costs.recalibration(me, folder, env, args.repeats, args.quick),
    )
    tiny = stage("tiny batches", lambda: costs.tiny_batches(me, args.repeats, args.quick))
    cold = stage("cold kernel cache", lambda: costs.cold_cache(me, folder, env))
    static = stage(
        "static audit",
        lambda: static_audit(folder, env, max(2, args.process_repeats), args.static_size),
    )
    ctx = Context(me, folder, env, args.threads, args.repeats, args.quick, log)
    extra = [stage(f"section {name}", lambda fn=fn: fn(ctx)) for name, fn in SECTIONS.items()]
    command = " ".join(["python", *check_command(cases[0], folder)[1:]])
    command = command.replace(str(folder), "$TMP").replace(str(ROOT) + "/", "")
    results = Results(
        head, cases, inproc, procs, rss, profiles, growth, by_batches, by_depth, static, command
    )
    results.costs = costs.render(recal, tiny, cold, met, table, TARGET_TIME)
    results.memory = memory_stages.render(me, cases, {c.name: rss[c.name]["stages"] for c in cases})
    results.extra = extra
    results.stages = dict(stage)
    return results


def peak_memory(case: Case, folder: Path, env: dict[str, str]) -> dict[str, Any]:
    """The peak RSS of each mode (MiB), and under "stages" the audit's stages."""
    got: dict[str, Any] = {
        mode: peak_rss(case, folder, env, mode, case.batches)
        for mode in ("idle", "plain", "passes", "floor", "audit")
    }
    got["stages"] = memory_stages.measure(sys.modules[__name__], case, folder, env)
    return got


RSS_HEADER = [
    "model",
    "idle MiB",
    "plain eval forward MiB",
    "plain passes MiB",
    "floor MiB",
    "audit MiB",
    "audit / plain",
    "audit / plain passes",
    "audit / floor",
]


def rss_row(name: str, got: dict[str, Any], batches: int) -> list[str]:
    """One model's peak-memory row (`peak_memory`'s figures)."""
    return [
        name,
        *(f"{got[m]:.0f}" for m in ("idle", "plain", "passes", "floor")),
        f"{got['audit']:.0f} ({batches} batches)",
        f"**{got['audit'] / got['plain']:.2f}**",
        f"{got['audit'] / got['passes']:.2f}",
        f"{got['audit'] / got['floor']:.2f}",
    ]


def memory_only(cases: tuple[Case, ...], env: dict[str, str]) -> list[str]:
    """--memory-only: the peak-memory table and the stages of `cases`, as RESULTS.md has them."""
    rows, stages = [], {}
    with tempfile.TemporaryDirectory(prefix="bnaudit-bench-") as tmp:
        folder = Path(tmp)
        for case in cases:
            log(f"{case.name}: building and calibrating")
            torch.save(build(case.factory, case.shape).state_dict(), folder / f"{case.name}.pt")
            log(f"{case.name}: peak memory")
            got = peak_memory(case, folder, env)
            stages[case.name] = got["stages"]
            rows.append(rss_row(case.name, got, case.batches))
    return [
        table(RSS_HEADER, rows),
        "",
        *memory_stages.render(sys.modules[__name__], cases, stages),
    ]


# --- child processes ------------------------------------------------------------------------


def child_plain(factory: str, ckpt: str, data: str) -> None:
    """What `bnaudit check` has to do anyway: load the files, run the passes."""
    model = getattr(models, factory)()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    plain_passes(model, torch.load(data, weights_only=True))


def child_rss(factory: str, ckpt: str, shape: str, mode: str, count: str) -> None:
    model = getattr(models, factory)()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model.eval()
    dims = tuple(int(d) for d in shape.split("x"))
    if mode == "plain":
        with torch.no_grad():
            model(next(batches_of(dims, 1, seed=2)))
    elif mode == "passes":
        plain_passes(model, list(batches_of(dims, int(count), seed=2)))
    elif mode == "floor":  # what an audit cannot go under: the passes, numba's code and heap
        warm_kernels()
        plain_passes(model, list(batches_of(dims, int(count), seed=2)))
    elif mode == "audit":
        import bnaudit

        # Re-iterable like a DataLoader: each batch is made when asked for, so neither side
        # holds the batches; the output-impact check iterates them again.
        class Loader:
            def __iter__(self) -> Iterator[Tensor]:
                return batches_of(dims, int(count), seed=2)

        bnaudit.audit(model, Loader())
    print(json.dumps({"peak_mib": peak_rss_kib() / 1024}))


def warm_kernels() -> None:
    """Load numba's kernels and run each one the audits here use once (NCHW on one thread and
    on several, channels-contiguous), on small tensors: LLVM links each at its first call."""
    from bnaudit.measure import fused

    for x in (torch.randn(2, 4, 8, 8), torch.randn(4, 4, 128, 128), torch.randn(16, 8)):
        fused.measure(x, x, None, None, 1e-5, None, x.dtype)


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the process that
    forked the child, so every child would report at least the benchmark's own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        child_plain(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_rss":
        child_rss(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_stages":
        memory_stages.child_stages(sys.modules[__name__], *sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_update_bn":
        costs.child_update_bn(*sys.argv[2:])
    else:
        main()
