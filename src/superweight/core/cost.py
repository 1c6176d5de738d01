"""An account of the model work a job does: tokens x decoder layers run, forward and backward apart.

    with Ledger(model) as ledger:                 # hooks on every decoder layer
        with ledger.stage("detect"):
            ...                                   # every block a forward pass runs adds its tokens
        with part("verify"):                      # a finer label inside the current stage (no-op without a ledger)
            ...
    ledger.counts["detect"].forward               # token-layers; / (eval tokens x layers) = eval-pass equivalents

A block counts when it runs: blocks skipped by a shared prefix (core/prefix.py makes them identities) do not,
and a pass stopped early (measure/inputs.py) counts the blocks it ran. Backward is counted where a gradient
reaches a block's output (a hook on that tensor), so the blocks under a patch that only its vector trains count
once each. Counting reads tensor shapes only: it never waits for the device.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field

from torch import nn

from superweight.core.arch import decoder_layers
from superweight.core.intervene import hidden
from superweight.core.prefix import _identity

_LABEL: ContextVar[tuple[str, ...]] = ContextVar("superweight_cost_label", default=())


@dataclass
class Count:
    """Token-layers run forward and backward."""

    forward: int = 0
    backward: int = 0
    parts: dict[str, "Count"] = field(default_factory=dict)


def counting() -> bool:
    """Whether a Ledger's stage is in force here (an outer job counts what runs)."""
    return bool(_LABEL.get())


@contextlib.contextmanager
def part(name: str):
    """Count what runs inside under `name`, below the current stage's label (a no-op when nothing counts)."""
    token = _LABEL.set((*_LABEL.get(), name))
    try:
        yield
    finally:
        _LABEL.reset(token)


class Ledger:
    """Counts every decoder layer's forward and backward tokens by the label in force (`stage`, `part`)."""

    def __init__(self, model: nn.Module):
        self.blocks = list(decoder_layers(model))
        self.n_layers = len(self.blocks)
        self.counts: dict[str, Count] = {}
        self._handles: list = []

    def _hook(self, block, _args, out):
        if vars(block).get("forward") is _identity:  # skipped: a shared prefix stands in for it
            return
        h = hidden(out)
        tokens = h.shape[:-1].numel()
        path = self._path()
        for c in path:
            c.forward += tokens
        if h.requires_grad:
            def on_grad(grad, path=path, tokens=tokens):
                for c in path:
                    c.backward += tokens
            h.register_hook(on_grad)

    def _path(self) -> list[Count]:
        """The stage's count and every part's below it (a part's work is also its stage's)."""
        label = _LABEL.get()
        if not label:
            return []
        out = [self.counts.setdefault(label[0], Count())]
        for name in label[1:]:
            out.append(out[-1].parts.setdefault(name, Count()))
        return out

    @contextlib.contextmanager
    def stage(self, name: str):
        """Count under the top-level label `name` inside the block."""
        token = _LABEL.set((name,))
        try:
            yield self.counts.setdefault(name, Count())
        finally:
            _LABEL.reset(token)

    def __enter__(self) -> "Ledger":
        self._handles = [b.register_forward_hook(self._hook) for b in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
