"""Share the layers below an intervention between the teacher and the student pass.

Teacher (intact) and student (ablated + patched) agree exactly on every block before the first edited
layer, so the student can start from the teacher's hidden state there:

    prefix = Prefix(model, layer=11)
    with prefix.capture():                # teacher pass records the input of block 11
        teacher = model(ids).logits
    with prefix.reuse(prefix.hidden):     # blocks 0..10 become identities; block 11 gets the cached input
        student = model(ids).logits

Decoder layers in transformers 5 return their hidden-state tensor, which is what makes the identity safe.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from superweight.core.arch import decoder_layers


def first_edited_layer(coords, rows) -> int:
    """The lowest layer that ablated weights (`WeightCoord`s) or patch rows ((layer, row[, expert])) touch: every
    block below it is the same with and without them, so it can be shared (`Prefix`, `measure(share_below=...)`)."""
    return min([c.layer for c in coords] + [r[0] for r in rows])


def _identity(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


class Prefix:
    def __init__(self, model: nn.Module, layer: int):
        self.blocks = decoder_layers(model)
        self.layer = layer
        self.hidden: torch.Tensor | None = None

    @contextmanager
    def capture(self):
        """Record (detached) the hidden state entering block `layer` during the next forward passes."""

        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.hidden = h.detach()

        handle = self.blocks[self.layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    @contextmanager
    def reuse(self, hidden: torch.Tensor):
        """Skip blocks below `layer` and feed `hidden` into block `layer` instead."""
        if self.layer == 0:  # nothing to skip; the embeddings are cheap
            yield self
            return

        def hook(_module, args, kwargs):
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        skipped = list(self.blocks)[: self.layer]
        previous = [vars(block).get("forward") for block in skipped]  # e.g. accelerate's wrappers
        handle = None
        try:
            for block in skipped:
                block.forward = _identity  # instance attribute shadows the class method
            handle = self.blocks[self.layer].register_forward_pre_hook(hook, with_kwargs=True)
            yield self
        finally:
            if handle is not None:
                handle.remove()
            for block, old in zip(skipped, previous):
                if old is not None:
                    block.forward = old
                elif "forward" in vars(block):
                    del block.forward
