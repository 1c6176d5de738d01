"""What a down-projection reads: its input x [tokens, d_ff] over some text, and what a patch writes from it.

    x, positions = down_inputs(model, ids, layer=11, max_length=512)     # 1-D ids, in windows
    x, _ = down_inputs(model, seqs, 11, mask=mask)                       # [N, T] sequences, real tokens only
    write = x @ d                                                        # the patch's write at each token

Forward passes stop at that layer: nothing above it is computed.
"""

from __future__ import annotations

import torch
from torch import nn

from superweight.core.arch import down_projection


class _Stop(Exception):
    """Ends a forward pass once the traced layer has been seen (nothing above it is needed)."""


@torch.no_grad()
def down_inputs(model: nn.Module, ids: torch.Tensor, layer: int, max_length: int = 512,
                mask: torch.Tensor | None = None, batch_size: int = 8) -> tuple[torch.Tensor, list[int]]:
    """The down-projection input x [tokens, d_ff] (fp32, CPU) of `layer`, and each token's position in its
    sequence. 1-D `ids` are cut into windows of `max_length`; 2-D `ids` [N, T] are sequences, run `batch_size`
    at a time, keeping the positions where `mask` is 1."""
    module = down_projection(model, layer).module
    device = next(model.parameters()).device
    acts: list[torch.Tensor] = []

    def hook(_m, inp, _out):
        acts.append(inp[0].float().cpu())
        raise _Stop

    if ids.dim() == 1:
        batches = [(ids[None, b : b + max_length], None) for b in range(0, ids.numel(), max_length)]
    else:
        m = torch.ones_like(ids) if mask is None else mask
        batches = [(ids[b : b + batch_size], m[b : b + batch_size]) for b in range(0, ids.shape[0], batch_size)]
    xs, positions = [], []
    handle = module.register_forward_hook(hook)
    try:
        for batch, m in batches:
            try:
                model(input_ids=batch.to(device), attention_mask=None if m is None else m.to(device),
                      use_cache=False)
            except _Stop:
                pass
            x = acts.pop()
            keep = torch.ones(batch.shape, dtype=torch.bool) if m is None else m.bool().cpu()
            xs.append(x[keep])
            positions += keep.nonzero()[:, 1].tolist()
    finally:
        handle.remove()
    return torch.cat(xs), positions


def patch_inputs(model: nn.Module, coords, rows, ids: torch.Tensor, max_length: int = 512,
                 max_tokens: int = 2048) -> dict[int, torch.Tensor]:
    """x [tokens, d_ff] for each patched layer over the first `max_tokens` of `ids`, read with the weights in
    `coords` ablated: what the patch reads (measure/geometry.py's write-based numbers)."""
    from superweight.core.intervene import Ablation

    with Ablation(model, coords):
        return {layer: down_inputs(model, ids[:max_tokens], layer, max_length)[0] for layer in {l for l, _ in rows}}
