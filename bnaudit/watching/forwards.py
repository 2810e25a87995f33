"""The watched model's own forward: which BN calls belong to it, and how many ran in a step.

A BN module applied at k sites of the forward (a U-Net's `DoubleConv` reusing one
`BatchNorm2d` after both convs) is called k times in every forward of the model, and updates k
times per micro-batch by design. What runs it again is either outside that forward (gradient
checkpointing recomputes during backward, with `use_reentrant` True and False alike: measured
on torch 2.13) or another forward of the model (a second forward per micro-batch). Two hooks
on the model tell them apart, with a counter and no tensor work.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class Forwards:
    """Hooks on the model's own forward: `depth` > 0 while one runs, `number` names it (the
    count since the watcher started), `count` the train-mode ones of the watched step."""

    def __init__(self, model: nn.Module) -> None:
        self.depth = self.number = self.count = 0
        self.on = False
        self._handles = [
            model.register_forward_pre_hook(self._enter, prepend=True),
            # always_call: a forward that raises still leaves, or every later call would look
            # like part of it.
            model.register_forward_hook(self._leave, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.depth += 1
        if self.depth == 1:  # the model calling itself is still the one forward
            self.number += 1
            if self.on and module.training:
                self.count += 1

    def _leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.depth = max(0, self.depth - 1)

    def take(self) -> int:
        """The train-mode forwards of the model since the last take; starts afresh."""
        out, self.count = self.count, 0
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
