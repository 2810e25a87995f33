"""The audit under torchrun: shards, exact merges, one verdict for every rank.

Under `torchrun`, every rank audits its share of the batches (batch i goes to rank i mod world,
unless the data shards itself), and what the hooks accumulated is merged exactly across ranks
through the accumulators' own `merge` (Chan's formula on count, mean and M2 in float64, maxima
by max, counts by sum), in rank order on every rank, so every rank holds the same merged
statistics and the merged report equals the single-process one up to float64 rounding.

Every message between ranks goes through `Ranks.exchange`, one object all-gather: a rank that
fails sends its error in place of its payload at its next exchange, which the others are
waiting in, so every rank stops with that message instead of waiting for a collective that
never comes. A rank that dies outright is caught by the process group's timeout (and by
torchrun, which stops the other workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import itertools
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from bnaudit.core.errors import BnauditError, describe
from bnaudit.measure.statistics import LayerStats, Moments

if TYPE_CHECKING:
    from bnaudit.gate.config import CheckSettings
    from bnaudit.measure.impact import OutputDiff
    from bnaudit.measure.passes import Passes

TIMEOUT_ENV = "BNAUDIT_DIST_TIMEOUT"  # seconds a rank waits for the others in one exchange
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo and nccl
SHARD_ARGS = ("rank", "world_size")  # a --data function taking both gets its own shard


class RankFailed(BnauditError):
    """A rank failed; every rank raises this with its message (the CLI exits 2)."""

    def __init__(self, rank: int, world: int, message: str) -> None:
        super().__init__(f"rank {rank} of {world} failed: {message}")
        self.rank = rank


@dataclass
class Ranks:
    """This process's place in the job, and the merges the audit needs across the job."""

    rank: int
    world: int
    local_rank: int = 0
    owns_group: bool = False  # initialised here, so destroyed here

    @property
    def leader(self) -> bool:
        """Rank 0 writes the reports and the checkpoint."""
        return self.rank == 0

    # -- the one collective ------------------------------------------------------------------

    def exchange(self, what: str, payload: Any, error: str | None = None) -> list[Any]:
        """Every rank's payload, in rank order; raises RankFailed if any rank sent an error.

        `what` names the step: ranks that reach different steps (one skipped a step another
        took) stop with an error instead of misreading each other's payloads."""
        gathered: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(gathered, (error, what, payload))
        except Exception as exc:  # a rank died or hung past the timeout
            raise BnauditError(
                f"rank {self.rank} of {self.world}: lost the other ranks ({describe(exc)}); a "
                f"rank died or is stuck (raise {TIMEOUT_ENV} for slow shards)"
            ) from exc
        for rank, (message, _, _) in enumerate(gathered):
            if message is not None:
                raise RankFailed(rank, self.world, message)
        steps = [step for _, step, _ in gathered]
        if len(set(steps)) > 1:
            raise BnauditError(
                f"rank {self.rank} of {self.world}: the ranks are out of step ({', '.join(steps)} "
                "for ranks 0, 1, ...): a rank skipped a step the others took"
            )
        return [p for _, _, p in gathered]

    def fail(self, message: str) -> None:
        """Tell every rank this one failed (they are, or will be, in an exchange); raises."""
        self.exchange("failure", None, error=message)

    def agree(self, code: int) -> int:
        """The exit code every rank returns: rank 0's, the rank that holds the reports."""
        return int(self.exchange("exit code", code)[0])

    def total(self, count: int) -> int:
        return sum(self.exchange("count", count))

    # -- inputs ------------------------------------------------------------------------------

    def device(self, spec: str) -> str:
        """`cuda` without an index means this rank's GPU, cuda:LOCAL_RANK."""
        return f"cuda:{self.local_rank}" if spec == "cuda" else spec

    def settings(self, s: CheckSettings) -> CheckSettings:
        """This rank's settings: its device; rank 0 alone writes reports and baselines, and
        reads the baseline (the gate's verdict is rank 0's)."""
        s = dataclasses.replace(s, device=self.device(s.device))
        if self.leader:
            return s
        files = ("markdown", "csv", "json", "html", "junit", "baseline", "write_baseline")
        return dataclasses.replace(s, **dict.fromkeys(files))

    def shard(self, batches: Iterable[Any], cap: int | None = None) -> Iterator[Any]:
        """Batch i of the first `cap` goes to rank i mod world."""
        return itertools.islice(batches, self.rank, cap, self.world)

    def share(self, cap: int | None) -> int | None:
        """This rank's part of `cap` batches when the data shards itself."""
        if cap is None:
            return None
        return cap // self.world + (1 if self.rank < cap % self.world else 0)

    def load(self, spec: str, batch_size: int, cap: int | None) -> Iterable[Any]:
        """This rank's batches of --data: a function taking `rank` and `world_size`, or a
        DataLoader with a DistributedSampler, gives its own shard; anything else is sharded
        round-robin."""
        from bnaudit.inputs.batches import load_batches

        fn = _data_function(spec)
        if fn is not None and _takes_shard(fn):
            batches = load_batches(
                spec, batch_size, call={"rank": self.rank, "world_size": self.world}
            )
            return itertools.islice(batches, self.share(cap))
        batches = load_batches(spec, batch_size)
        if _distributed_sampler(batches):
            return itertools.islice(batches, self.share(cap))
        return self.shard(batches, cap)

    # -- merges (bnaudit.measure.impact.Across) ------------------------------------------------

    def merge_passes(self, passes: Passes) -> Passes:
        """Every rank's probes merged into this rank's, in rank order, and the global count."""
        mine = [
            (p.stats, p.diagnosis, p.nonfinite_inputs, p.nonfinite_outputs) for p in passes.probes
        ]
        parts = self.exchange(
            "audit passes", (passes.count, passes.feed, passes.order, _moved(mine, "cpu"))
        )
        device = _probe_device(passes)
        for i, p in enumerate(passes.probes):
            p.stats = LayerStats()
            p.diagnosis = {regime: type(d)() for regime, d in p.diagnosis.items()}
            p.nonfinite_inputs = p.nonfinite_outputs = 0
            for _, _, _, states in parts:
                stats, diagnosis, bad_in, bad_out = _moved(states[i], device)
                p.stats.merge(stats)
                for regime, d in diagnosis.items():
                    p.diagnosis[regime].merge(d)
                p.nonfinite_inputs += bad_in
                p.nonfinite_outputs += bad_out
        # The first rank that ran a batch saw the layers in their order; all ranks run the same
        # model, so which one it is does not matter.
        order = next((o for _, _, o, _ in parts if o), ())
        feed = next((f for _, f, _, _ in parts if f), "")
        count = sum(c for c, _, _, _ in parts)
        return dataclasses.replace(passes, count=count, feed=feed, order=order)

    def moments(
        self, moments: dict[str, tuple[Moments, Moments]]
    ) -> dict[str, tuple[Moments, Moments]]:
        """Per layer (means, variances) accumulators of every rank, merged in rank order."""
        parts = self.exchange("input moments", _moved(moments, "cpu"))
        device = next(
            (m.mean.device for pair in moments.values() for m in pair if m.mean is not None),
            torch.device("cpu"),
        )
        merged = {name: (Moments(), Moments()) for name in moments}
        for part in parts:
            for name, (means, variances) in _moved(part, device).items():
                merged[name][0].merge(means)
                merged[name][1].merge(variances)
        return merged

    def diff(self, diff: OutputDiff, passes: int) -> tuple[OutputDiff, int]:
        """Output comparisons of every rank's batches as one; forward passes summed."""
        from bnaudit.measure.impact import OutputDiff

        out, total = OutputDiff(), 0
        for d, used in self.exchange("output diff", (diff, passes)):
            out.sq_diff += d.sq_diff
            out.sq_ref += d.sq_ref
            out.max_abs = max(out.max_abs, d.max_abs)
            out.agree += d.agree
            out.rows += d.rows
            out.classes &= d.classes and out.width in (0, d.width)
            out.width = d.width or out.width
            total += used
        return out, total

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def from_env(environ: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment; None outside torchrun."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise BnauditError(f"torchrun environment: RANK/WORLD_SIZE/LOCAL_RANK: {exc}") from None
    if not 0 <= rank < world:
        raise BnauditError(f"torchrun environment: RANK={rank} is not below WORLD_SIZE={world}")
    return rank, world, local


def join() -> Ranks | None:
    """Join the job torchrun started (or the process group already running); None when this
    process is not part of one. CPU tensors go over gloo, CUDA tensors over nccl."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), _local_rank(), owns_group=False)
    found = from_env()
    if found is None:
        return None
    if not dist.is_available():
        raise BnauditError("torchrun environment found, but this torch has no torch.distributed")
    rank, world, local = found
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise BnauditError(f"torchrun environment: {key} is not set; start with torchrun")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=_timeout())
        )
    except Exception as exc:
        raise BnauditError(
            f"rank {rank} of {world}: cannot join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {describe(exc)}"
        ) from exc
    return Ranks(rank, world, local, owns_group=True)


@contextlib.contextmanager
def session() -> Iterator[Ranks | None]:
    """The ranks for one command: any exception on this rank is sent to the others (so that
    all of them exit 2 with it), and the process group is closed on the way out."""
    ranks = join()
    if ranks is None:
        yield None
        return
    try:
        yield ranks
    except RankFailed:
        raise  # every rank already knows
    except BaseException as exc:
        message = str(exc) if isinstance(exc, BnauditError) else f"internal error: {describe(exc)}"
        ranks.fail(message)  # raises RankFailed on this rank too
        raise
    finally:
        ranks.close()


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise BnauditError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


def _local_rank() -> int:
    found = from_env()
    return found[2] if found else 0


def _data_function(spec: str) -> Any:
    from pathlib import Path

    from bnaudit.inputs.specs import import_object

    if Path(spec).exists() or ":" not in spec:
        return None
    try:
        return import_object(spec, what="--data")
    except BnauditError:
        return None  # load_batches says what is wrong with it


def _takes_shard(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in SHARD_ARGS)


def _distributed_sampler(batches: Any) -> bool:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(batches, DataLoader):
        return False
    inner = getattr(batches.batch_sampler, "sampler", None)
    return isinstance(batches.sampler, DistributedSampler) or isinstance(inner, DistributedSampler)


def _probe_device(passes: Passes) -> torch.device:
    for p in passes.probes:
        for t in p.module.buffers(recurse=False):
            return t.device
    return torch.device("cpu")


def _moved(obj: Any, device: torch.device | str) -> Any:
    """A copy of nested accumulators (dataclasses, dicts, lists, tuples) with every tensor on
    `device`; CPU copies are what goes between ranks."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = dataclasses.fields(obj)
        return dataclasses.replace(
            obj, **{f.name: _moved(getattr(obj, f.name), device) for f in fields if f.init}
        )
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_moved(v, device) for v in obj)
    return obj
