"""What a down-projection reads: its input x [tokens, d_ff] over some text, and what a patch writes from it.

    x, positions = down_inputs(model, ids, layer=11, max_length=512)     # 1-D ids, in windows
    xmax = input_maxima(model, ids, down_projections(model))             # max_t |x_t| per down-projection
    write = x @ d                                                        # the patch's write at each token

Forward passes stop at that layer: nothing above it is computed. With `bos` on (io/corpora.Bos) every window
starts with the BOS token, as `measure` reads them: a BOS and max_length - 1 tokens of text. x then has a row
for each BOS too (where massive activations tend to sit): `seen_ids` gives the token of every row. An expert's
input (`expert=`) is its routed input (core/moe.py): zero at the tokens the router does not send to it.
"""

from __future__ import annotations

import torch
from torch import nn

from superweight.core.arch import DownProj, decoder_layers, down_projection, input_device, moe_block
from superweight.core.head import trunk
from superweight.core.coords import site, split_row
from superweight.core.intervene import Ablation, Trace, hidden
from superweight.io.corpora import NO_BOS, Bos, with_bos


class _Stop(Exception):
    """Ends a forward pass once the traced layer has been seen (nothing above it is needed)."""


@torch.no_grad()
def down_inputs(model: nn.Module, ids: torch.Tensor, layer: int, max_length: int = 512,
                bos: Bos = NO_BOS, expert=None) -> tuple[torch.Tensor, list[int]]:
    """The down-projection input x [positions, d_ff] (fp32, CPU) of `layer` (of its `expert`, in a mixture of
    experts) over the 1-D `ids` in windows of `max_length` (each starting with a `bos` token, when given), and
    each row's position in its window. Row r reads token `seen_ids(ids, max_length, bos)[r]` (that is ids[r]
    without a BOS)."""
    dp = down_projection(model, layer, expert)
    device = input_device(model)
    acts: list[torch.Tensor] = []

    def hook(_m, inp, _out):
        x = dp.inputs(inp)
        acts.append(x.reshape(-1, x.shape[-1]).float().cpu())
        raise _Stop

    handle = dp.module.register_forward_hook(hook)
    positions: list[int] = []
    try:
        for window in _windows(ids, max_length, bos):
            positions.extend(range(window.numel()))
            try:
                trunk(model)(input_ids=window[None].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(acts), positions


@torch.no_grad()
def input_maxima(model: nn.Module, ids: torch.Tensor, dps: list[DownProj], max_length: int = 512,
                 bos: Bos = NO_BOS) -> list[torch.Tensor]:
    """max_t |x_t[c]| per input column c of each down-projection in `dps` (fp32, on the model's input device),
    over `ids` in the windows `down_inputs` reads: what detection's activation scores |W[r,c]| * max_t |x_t[c]|
    and its control weights are ranked by."""
    device = input_device(model)
    xmax = [torch.zeros(dp.d_ff, device=device) for dp in dps]

    def record(i, inp, _out):
        x = dps[i].inputs(inp).detach().float().abs().flatten(0, -2).max(0).values
        xmax[i] = torch.maximum(xmax[i], x.to(device))

    def stop(*_):
        raise _Stop

    # Passes stop after the highest layer read (its whole block, so every expert of it has run).
    last = decoder_layers(model)[max(dp.layer for dp in dps)].register_forward_hook(stop)
    try:
        with Trace(dict(enumerate(dp.module for dp in dps)), record):
            for window in _windows(ids, max_length, bos):
                try:
                    trunk(model)(input_ids=window[None].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        last.remove()
    return xmax


def _windows(ids: torch.Tensor, max_length: int, bos: Bos) -> list[torch.Tensor]:
    """The windows the model reads: max_length tokens, or a BOS and max_length - 1 tokens."""
    span = max_length - bos.on
    if span < 1:
        raise ValueError(f"max_length must be at least 2 with a BOS, got {max_length}")
    return [with_bos(ids[None, begin : begin + span], bos)[0] for begin in range(0, ids.numel(), span)]


def seen_ids(ids: torch.Tensor, max_length: int = 512, bos: Bos = NO_BOS) -> torch.Tensor:
    """The tokens `down_inputs` reads, in its row order: `ids` with a BOS before each window (`ids` without)."""
    return torch.cat(_windows(ids, max_length, bos)) if bos.on else ids


def patch_inputs(model: nn.Module, coords, rows, ids: torch.Tensor, max_length: int = 512,
                 max_tokens: int = 2048, bos: Bos = NO_BOS) -> dict:
    """x [positions, d_ff] for each patched down-projection (keyed by coords.site: the layer, or (layer, expert))
    over the first `max_tokens` of `ids` (windows starting with `bos`, when given), read with the weights in
    `coords` ablated: what the patch reads (measure/geometry.py's write-based numbers)."""
    sites = {site(r): split_row(r) for r in rows}
    with Ablation(model, coords):
        return {key: down_inputs(model, ids[:max_tokens], layer, max_length, bos, expert)[0]
                for key, (layer, _row, expert) in sites.items()}


@torch.no_grad()
def router_choices(model: nn.Module, ids: torch.Tensor, layer: int, max_length: int = 512,
                   bos: Bos = NO_BOS) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index [positions, k]: the experts the router of MoE layer `layer` picks at each token, residual
    [positions, d_model]: the residual stream after that layer), over `ids` in the windows `down_inputs` reads,
    with whatever intervention is on. Passes stop at that layer."""
    found = moe_block(model, layer)
    if found is None:
        raise ValueError(f"layer {layer} has no router")
    router, block = found[1], decoder_layers(model)[layer]
    picks: list[torch.Tensor] = []
    resid: list[torch.Tensor] = []

    def on_router(_m, _inp, out):
        picks.append(out[2].reshape(-1, out[2].shape[-1]).cpu())

    def on_block(_m, _inp, out):
        h = hidden(out)
        resid.append(h.reshape(-1, h.shape[-1]).float().cpu())
        raise _Stop

    handles = [router.register_forward_hook(on_router), block.register_forward_hook(on_block)]
    try:
        for window in _windows(ids, max_length, bos):
            try:
                trunk(model)(input_ids=window[None].to(input_device(model)), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(picks), torch.cat(resid)
