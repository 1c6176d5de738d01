"""The mechanism view: how the damage of a super-weight ablation travels, through the attention sink.

The super weight writes the massive activation; that activation makes its token an attention sink (Sun et al.
2024, "Massive activations in large language models"). `sink_view` measures, per layer and for the base model
and each condition (broken, patched):

- the residual-stream norm after the block at the massive-activation token and at a typical token (the median
  over the window's other tokens);
- the attention mass each head puts on the sink token(s) (mean over queries after the first sink): mean and
  standard deviation over heads, and the share of heads whose mass exceeds SINK_THRESHOLD;
- the mean attention entropy, and the fraction of the per-head entropy change (condition vs base) that the patch
  undoes: 1 - sum_h |H_patched,h - H_base,h| / sum_h |H_broken,h - H_base,h|.

    with Ablation(model, coords) as broken: ...
    view = sink_view(model, ids, {"broken": broken, "patched": patched}, channel=(11, 507))
    view.layers[12].broken.sink_mass, view.breaks_at, view.restored

The sink tokens of a window are where the base model's residual channel `channel` (the super weight's row after
its layer) is at least MASSIVE_FRACTION of its largest value in the window, and the BOS (position 0) when windows
start with one; every condition is measured on the same positions.

Attention weights are read only here: the model runs with eager attention inside `eager_attention` (the
config's `_attn_implementation` switched and restored, whatever happens), and a forward hook on each layer's
attention module reduces its [batch, heads, T, T] probabilities at once to the sink mass and entropy per head,
so one layer's attention matrix exists at a time. Windows hold at most WINDOW tokens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from superweight.core.arch import decoder_layers, input_device
from superweight.core.head import trunk
from superweight.core.intervene import Intervention, NoIntervention, Trace, hidden
from superweight.core.prefix import Prefix
from superweight.errors import UnsupportedArchitectureError
from superweight.io.corpora import NO_BOS, Bos, windows as make_windows, with_bos
from superweight.schema.sinks import SinkCondition, SinkLayer, Sinks

SINK_THRESHOLD = 0.3  # a head "has a sink" when its mean attention mass on the sink tokens exceeds this
MASSIVE_FRACTION = 0.5  # sink tokens: |residual[..., row]| >= this fraction of the window's largest
BREAK_DROP = 0.5  # the sink breaks at the first layer whose mean sink mass falls below (1 - this) x base's
WINDOW = 256  # tokens per window for this view (the attention matrix grows as T^2)
MAX_TOKENS = 2048  # text tokens the view reads at most (4 passes per window)
BATCH_TOKENS = 1024
ENTROPY_EPS = 1e-4  # a layer whose summed per-head entropy change is below this (nats) has none to undo
ATTENTION_NAMES = ("self_attn", "attn", "attention")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's attention module (self_attn, attn or attention)."""
    out = []
    for i, block in enumerate(decoder_layers(model)):
        module = next((getattr(block, n) for n in ATTENTION_NAMES if isinstance(getattr(block, n, None), nn.Module)),
                      None)
        if module is None:
            raise UnsupportedArchitectureError(f"layer {i} ({type(block).__name__}) has no attention module named "
                                               f"{', '.join(ATTENTION_NAMES)}")
        out.append(module)
    return out


def _configs(model: nn.Module) -> list:
    """Every distinct config object the model's modules hold (the top one, sub-configs, per-module ones)."""
    seen: dict[int, object] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run `model` with eager attention (which computes the probabilities) inside the block only: every config's
    `_attn_implementation` is set to "eager" and put back as it was on exit, even when the block raises."""
    saved = [(c, c._attn_implementation_internal) for c in _configs(model)]
    try:
        for c, _ in saved:
            c._attn_implementation_internal = "eager"
        yield
    finally:
        for c, value in saved:
            c._attn_implementation_internal = value


class _Acc:
    """Per-layer running sums for one condition: sink mass and entropy per head, residual norms per window."""

    def __init__(self, n_layers: int):
        self.mass = [None] * n_layers  # [H] sums over queries
        self.entropy = [None] * n_layers
        self.queries = [0] * n_layers  # queries counted for the mass
        self.entropy_queries = [0] * n_layers
        self.norm_massive = [0.0] * n_layers
        self.norm_typical = [0.0] * n_layers
        self.windows = 0

    def add(self, store: list, layer: int, value: torch.Tensor) -> None:
        store[layer] = value if store[layer] is None else store[layer] + value


def _attention_hook(acc: _Acc, layer: int, sink: torch.Tensor, queries: torch.Tensor):
    """Reduce layer `layer`'s attention probabilities to the sums `acc` keeps; the matrix is then dropped."""

    def hook(_module, _inp, out):
        weights = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
        if weights is None:
            raise UnsupportedArchitectureError(
                f"layer {layer}'s attention returned no weights with eager attention: this model's attention does "
                "not go through transformers' attention interface")
        a = weights.detach().float()  # [B, H, T, T]
        s, q = sink.to(a.device), queries.to(a.device)
        mass = (a * s[:, None, None, :]).sum(-1)  # [B, H, T]: each query's mass on the sink tokens
        acc.add(acc.mass, layer, (mass * q[:, None, :]).sum((0, 2)).double().cpu())
        acc.queries[layer] += int(q.sum())
        ent = -(a * a.clamp_min(1e-30).log()).sum(-1)[:, :, 1:]  # query 0 sees one token: entropy 0
        acc.add(acc.entropy, layer, ent.sum((0, 2)).double().cpu())
        acc.entropy_queries[layer] += ent.shape[0] * ent.shape[2]

    return hook


def _norm_hook(acc: _Acc, sink: torch.Tensor, massive: torch.Tensor):
    def record(layer, _inp, out):
        h = hidden(out).detach().float()  # [B, T, D]
        norms = h.norm(dim=-1).cpu()  # [B, T]
        rows = torch.arange(norms.shape[0])
        acc.norm_massive[layer] += norms[rows, massive].sum().item()
        for b in range(norms.shape[0]):
            others = norms[b][~sink[b]]
            acc.norm_typical[layer] += (others.median() if others.numel() else norms[b].median()).item()

    return record


def _trunk(model: nn.Module) -> nn.Module:
    """The model without its LM head: the view needs no logits, which for a large vocabulary (Gemma's 262k) would
    be most of the memory and much of the time."""
    return trunk(model)


def sink_positions(model: nn.Module, input_ids: torch.Tensor, channel: tuple[int, int],
                   bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] mask of the sink tokens and [B] the massive-activation token (argmax of |channel|) per window,
    from the model as it is (the base model): tokens whose |residual[..., row]| after block `layer` is at least
    MASSIVE_FRACTION of the window's largest, and position 0 when windows start with a BOS."""
    layer, row = channel
    seen = {}

    def grab(_name, _inp, out):
        seen["h"] = hidden(out)[..., row].detach().float().abs().cpu()

    def grab_and_stop(*args):
        grab(*args)
        raise _Stop  # nothing above the channel's layer is needed

    try:
        with Trace({layer: decoder_layers(model)[layer]}, grab_and_stop):
            _trunk(model)(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    h = seen["h"]  # [B, T]
    massive = h.argmax(-1)
    sink = h >= MASSIVE_FRACTION * h.max(-1, keepdim=True).values
    if bos:
        sink[:, 0] = True
    return sink, massive


class _Stop(Exception):
    """Ends the pass that finds the sink tokens once the channel's layer has run."""


def _queries(sink: torch.Tensor) -> torch.Tensor:
    """[B, T] the queries whose sink mass counts: after the window's first sink token, and not a sink itself."""
    t = torch.arange(sink.shape[1])
    first = sink.float().argmax(-1)  # the first True
    return (t[None, :] > first[:, None]) & ~sink


@torch.no_grad()
def sink_view(
    model: nn.Module,
    ids: torch.Tensor,
    conditions: dict[str, Intervention],
    channel: tuple[int, int],
    bos: Bos = NO_BOS,
    window: int = WINDOW,
    max_tokens: int = MAX_TOKENS,
    share_below: int = 0,
) -> Sinks:
    """The sink view over the first `max_tokens` of `ids` in windows of `window` tokens (BOS included), for the
    base model and each of `conditions` (names other than "base"; "broken" and "patched" give the summary).
    `share_below=L` promises that no condition touches blocks below L: the conditions start from the base pass's
    hidden state at block L (core/prefix.py), and their numbers for the layers below are the base's."""
    t0 = time.perf_counter()
    threshold = SINK_THRESHOLD
    prefix = Prefix(model, share_below)
    blocks, attn = decoder_layers(model), attention_modules(model)
    n_layers = len(blocks)
    ids = ids[:max_tokens]
    wins = make_windows(ids.numel(), window, window - int(bos.on), bos=bos)
    wins = [w for w in wins if w.end - w.begin == wins[0].end - wins[0].begin]  # equal lengths: no padding
    per_batch = max(1, BATCH_TOKENS // window)
    names = ["base", *conditions]
    accs = {name: _Acc(n_layers) for name in names}
    interventions = {"base": NoIntervention(), **conditions}
    device = input_device(model)
    positions: list[list[int]] = []
    for i in range(0, len(wins), per_batch):
        batch = wins[i : i + per_batch]
        input_ids = with_bos(torch.stack([ids[w.begin : w.end] for w in batch]), bos).to(device)
        sink, massive = sink_positions(model, input_ids, channel, bos.on)
        positions += [torch.nonzero(s).flatten().tolist() for s in sink]
        queries = _queries(sink)
        with eager_attention(model):
            for name in names:
                acc = accs[name]
                handles = [m.register_forward_hook(_attention_hook(acc, j, sink, queries)) for j, m in enumerate(attn)]
                shared = prefix.capture() if name == "base" else prefix.reuse(prefix.hidden)
                try:
                    with interventions[name], shared, Trace(dict(enumerate(blocks)), _norm_hook(acc, sink, massive)):
                        _trunk(model)(input_ids=input_ids, use_cache=False)
                finally:
                    for h in handles:
                        h.remove()
                acc.windows += len(batch)
    for name in conditions:  # below share_below every condition is the base model
        for store in ("mass", "entropy", "queries", "entropy_queries", "norm_massive", "norm_typical"):
            getattr(accs[name], store)[:share_below] = getattr(accs["base"], store)[:share_below]
    layers = []
    for j in range(n_layers):
        per = {name: _condition(accs[name], j, threshold) for name in names}
        heads = {name: accs[name].entropy[j] / max(accs[name].entropy_queries[j], 1) for name in names}
        undone = None
        if "broken" in heads and "patched" in heads:
            change = (heads["broken"] - heads["base"]).abs().sum().item()
            if change >= ENTROPY_EPS:
                undone = 1 - (heads["patched"] - heads["base"]).abs().sum().item() / change
        layers.append(SinkLayer(layer=j, conditions=per, entropy_undone=undone))
    breaks, restored = summarize(layers)
    return Sinks(
        channel=f"{channel[0]}:{channel[1]}", window=window, windows=len(wins),
        n_tokens=sum(w.end - w.begin for w in wins),
        threshold=threshold, massive_fraction=MASSIVE_FRACTION, break_drop=BREAK_DROP, positions=positions,
        layers=layers, breaks_at=breaks, restored=restored, seconds=time.perf_counter() - t0)


def _condition(acc: _Acc, layer: int, threshold: float) -> SinkCondition:
    per_head = acc.mass[layer] / max(acc.queries[layer], 1)  # [H]
    n = max(acc.windows, 1)
    return SinkCondition(
        sink_mass=per_head.mean().item(),
        sink_mass_std=per_head.std(unbiased=False).item(),
        sink_heads=(per_head > threshold).double().mean().item(),
        entropy=(acc.entropy[layer] / max(acc.entropy_queries[layer], 1)).mean().item(),
        norm_massive=acc.norm_massive[layer] / n,
        norm_typical=acc.norm_typical[layer] / n,
    )


def summarize(layers: list[SinkLayer], drop: float = BREAK_DROP) -> tuple[int | None, float | None]:
    """(the first layer whose broken sink mass falls below (1 - drop) x base's, the share of the lost sink mass
    the patch gives back from that layer on: mean over those layers of (patched - broken) / (base - broken),
    summed before dividing); (None, None) when the sink never breaks."""
    breaks = next((e.layer for e in layers if "broken" in e.conditions
                   and e.conditions["broken"].sink_mass < (1 - drop) * e.conditions["base"].sink_mass), None)
    if breaks is None or any("patched" not in e.conditions for e in layers):
        return breaks, None
    after = [e.conditions for e in layers if e.layer >= breaks]
    lost = sum(c["base"].sink_mass - c["broken"].sink_mass for c in after)
    back = sum(c["patched"].sink_mass - c["broken"].sink_mass for c in after)
    return breaks, (back / lost if lost > 0 else None)
