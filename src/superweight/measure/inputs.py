"""What a down-projection reads: its input x [tokens, d_ff] over some text, and what a patch writes from it.

    x, positions = down_inputs(model, ids, layer=11, max_length=512)     # 1-D ids, in windows
    write = x @ d                                                        # the patch's write at each token

Forward passes stop at that layer: nothing above it is computed.
"""

from __future__ import annotations

import torch
from torch import nn

from superweight.core.arch import down_projection, input_device
from superweight.core.intervene import Ablation


class _Stop(Exception):
    """Ends a forward pass once the traced layer has been seen (nothing above it is needed)."""


@torch.no_grad()
def down_inputs(model: nn.Module, ids: torch.Tensor, layer: int, max_length: int = 512) -> tuple[torch.Tensor, list[int]]:
    """The down-projection input x [tokens, d_ff] (fp32, CPU) of `layer` over the 1-D `ids` in windows of
    `max_length`, and each token's position in its window."""
    module = down_projection(model, layer).module
    device = input_device(model)
    acts: list[torch.Tensor] = []

    def hook(_m, inp, _out):
        acts.append(inp[0].reshape(-1, inp[0].shape[-1]).float().cpu())
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        for begin in range(0, ids.numel(), max_length):
            try:
                model(input_ids=ids[None, begin : begin + max_length].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(acts), [t % max_length for t in range(ids.numel())]


def patch_inputs(model: nn.Module, coords, rows, ids: torch.Tensor, max_length: int = 512,
                 max_tokens: int = 2048) -> dict[int, torch.Tensor]:
    """x [tokens, d_ff] for each patched layer over the first `max_tokens` of `ids`, read with the weights in
    `coords` ablated: what the patch reads (measure/geometry.py's write-based numbers)."""
    with Ablation(model, coords):
        return {layer: down_inputs(model, ids[:max_tokens], layer, max_length)[0] for layer in {l for l, _ in rows}}
