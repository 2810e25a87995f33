"""bnaudit on torch.distributed: the audit under torchrun (`ranks`), cross-rank drift (`drift`)."""

from bnaudit.distributed.drift import (
    DriftMonitor,
    LayerDrift,
    RankDrift,
    compare_ranks,
    write_merged,
)
from bnaudit.distributed.ranks import RankFailed, Ranks, join, session

__all__ = [
    "DriftMonitor",
    "LayerDrift",
    "RankDrift",
    "RankFailed",
    "Ranks",
    "compare_ranks",
    "join",
    "session",
    "write_merged",
]
