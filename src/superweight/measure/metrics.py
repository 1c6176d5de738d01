"""Token NLL / PPL, KL to the base model, top-1 agreement and super-activation size, with one model copy.

`measure` runs each batch once with no intervention (the base) and once per named condition, so every
condition is compared against the same base log-probabilities without a second model in memory:

    ids = corpora.tokenize(tok, corpora.load_text("pydoc", "eval"), 4096)
    out = measure(model, ids, {"ablated": Ablation(model, coords)}, channels=[(11, 507)])
    out["base"].ppl, out["ablated"].ppl, out["ablated"].kl

All log-softmaxes are taken in fp32 whatever the model dtype. KL is KL(base || condition) per scored token,
averaged; NLL is the mean over scored tokens; PPL = exp(NLL).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import nn

from superweight.core.arch import decoder_layers, input_device
from superweight.core.cost import part
from superweight.core.head import CHUNK_BUDGET, LIVE_COPIES, chunk_tokens, head_of, trunk
from superweight.core.intervene import Intervention, Trace, hidden
from superweight.core.prefix import Prefix
from superweight.errors import UsageError
from superweight.io.corpora import NO_BOS, Bos, Window, windows as make_windows, with_bos
from superweight.io.models import model_id
from superweight.io.provenance import provenance
from superweight.schema.record import Metrics, Protocol


class _Acc:
    """Running sums for one condition, kept on the device (read once, at the end)."""

    def __init__(self):
        self.nll: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []
        self.n = 0
        self.act: dict[str, torch.Tensor] = {}

    def copy(self) -> "_Acc":
        out = _Acc()
        out.nll, out.kl, out.agree, out.n, out.act = list(self.nll), list(self.kl), list(self.agree), self.n, dict(self.act)
        return out

    def result(self) -> Metrics:
        nll = _total(self.nll) / self.n
        kl = _total(self.kl) / self.n
        acts = {k: float(v) for k, v in sorted(self.act.items())}
        return Metrics(
            nll=nll,
            ppl=math.exp(min(nll, 700.0)),
            kl=max(kl, 0.0),
            top1_agree=(_total(self.agree) / self.n) if self.agree else 1.0,
            super_activation=max(acts.values()) if acts else None,
            super_activation_by_channel=acts,
            n_tokens=self.n,
        )


def _total(parts: list[torch.Tensor]) -> float:
    """The sum of per-chunk sums, in float64, with one read from the device."""
    return float(torch.stack([p.detach().double().cpu() for p in parts]).sum()) if parts else 0.0



def _batches(wins: list[Window], batch_tokens: int, cuts=()) -> list[list[Window]]:
    """Group windows of equal length into batches of about `batch_tokens` tokens (no padding needed); a batch
    ends where the scored tokens before a window reach one of `cuts` (so a subset ends on a batch boundary)."""
    out: list[list[Window]] = []
    scored = start = 0
    for w in wins:
        length = w.end - w.begin
        cut = any(start < c <= scored for c in cuts)
        if out and not cut and len(out[-1]) * length < batch_tokens and out[-1][0].end - out[-1][0].begin == length:
            out[-1].append(w)
        else:
            out.append([w])
            start = scored
        scored += w.n_scored
    return out


def _final_states(model, head, input_ids, watch):
    """Every position's final hidden states [B, T - 1, D] (with a checked head) or fp32 log-probs [B, T - 1, V]
    (without), recording super activations on the way (`watch`: (blocks by (layer, row), accumulator dict, and
    a dict that gets each channel's max |activation| per row of the batch, or None))."""
    watched, acc_act, per_row = watch

    def record(name, _inp, out):
        layer, row = name
        value = hidden(out)[..., row].detach().abs().flatten(1).amax(-1).float()  # one per row of the batch
        key = f"{layer}:{row}"
        if per_row is not None:
            per_row[key] = value
        value = value.amax()
        acc_act[key] = torch.maximum(acc_act[key], value) if key in acc_act else value

    with Trace(watched, record):
        if head is not None:
            return trunk(model)(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        return model(input_ids=input_ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)


def _scored(states: torch.Tensor, mask) -> torch.Tensor:
    """The scored positions [N, ...] of [B, T - 1, ...] states (boolean indexing copies: skipped when all are)."""
    return states.flatten(0, 1) if mask is None else states[mask]


class Passes:
    """Passes over eval windows, kept for the next `measure` of the same model on the same windows (`run` measures
    its repair, its second repair and its analyses on the first windows of one eval text): the base pass of each
    window, and the pass of each condition a caller names by an identity (`Scoring.keep`). Per (who, window),
    keyed by the window's tokens: the last hidden states of its positions, the state entering each shared layer
    (base only) and each watched channel's max |activation|, on the model's device. A later `measure` whose every
    window of a batch is kept runs no pass for it. Valid while the model's weights stay as they were (every
    condition's intervention is undone after it); a model without a checked head (core/head.py) keeps nothing."""

    def __init__(self):
        self.windows: dict[tuple, dict] = {}  # (who, window tokens) -> {"final", "prefix", "act"}

    def serve(self, who: str, keys: list[tuple], prefixes: dict, channels: set[str], act: dict):
        """The kept final states [B, T - 1, D] of `who` over the batch's windows, or None unless every window is
        kept with the `prefixes` layers and `channels` asked for; sets those prefixes' hidden states and adds the
        channels' maxima to `act` (an accumulator's)."""
        found = [self.windows.get((who, k)) for k in keys]
        if any(f is None or not prefixes.keys() <= f["prefix"].keys() or not channels <= f["act"].keys()
               for f in found):
            return None
        for layer, prefix in prefixes.items():
            prefix.hidden = torch.stack([f["prefix"][layer] for f in found])
        for key in channels:
            value = torch.stack([f["act"][key] for f in found]).amax()
            act[key] = torch.maximum(act[key], value) if key in act else value
        return torch.stack([f["final"] for f in found])

    def keep(self, who: str, keys: list[tuple], final: torch.Tensor, prefixes: dict[int, torch.Tensor],
             act: dict) -> None:
        for i, key in enumerate(keys):
            self.windows[who, key] = {"final": final[i], "prefix": {layer: h[i] for layer, h in prefixes.items()},
                                      "act": {k: v[i] for k, v in act.items()}}


def _kept_pass(model, head, input_ids, who: str, ctx, prefixes: dict):
    """The final states [B, T - 1, ·] of one pass, served by `passes` when it kept every window of the batch, else
    run (and kept, when `passes` is given and the model has a checked head). `ctx`: (watched blocks, the
    accumulator's act dict, Passes or None, the windows' keys); `prefixes` {layer: Prefix}: captured by the pass
    (base) and served with it. The caller enters the condition's intervention and prefix reuse around a pass."""
    watched, act, passes, keys = ctx
    passes = passes if head is not None else None
    channels = {f"{layer}:{row}" for layer, row in watched}
    if passes is not None and (served := passes.serve(who, keys, prefixes, channels, act)) is not None:
        return served
    per_row = {} if passes is not None else None
    with contextlib.ExitStack() as stack:
        for prefix in prefixes.values():
            stack.enter_context(prefix.capture())
        states = _final_states(model, head, input_ids, (watched, act, per_row))
    if passes is not None:
        passes.keep(who, keys, states, {layer: p.hidden for layer, p in prefixes.items()}, per_row)
    return states


@dataclass(frozen=True)
class Scoring:
    """How `measure` runs its passes, and who watches them.

    `share_below=L` promises that no condition touches blocks below L: they run once per batch, in the base
    pass, and every condition starts from the base's hidden state at block L (`prefix.Prefix`). A dict
    {condition: L} makes the promise per condition (absent: 0); a watched channel below a condition's L then
    reads the base's value, which is that condition's too.
    `progress(n)` is called after each batch with the number of tokens it covered.
    `observe(name, log_probs [n, V] fp32, labels [n])` sees every chunk's scored log-probs ("base" first).
    `batch_tokens`: tokens per forward pass (fewer when the conditions' final states would pass `chunk_bytes`).
    `chunk_bytes`: the byte budget of the vocab-sized tensors: log-softmax, KL, NLL and top-1 run over chunks of
    tokens sized from it and the vocabulary, so memory does not grow with tokens x vocabulary.
    `subsets` {condition: n} scores that condition on the first windows holding at least n scored tokens only;
    the results then add "base@n" and "<other condition>@n": the others over the same tokens, to compare with.
    `passes` (Passes) keeps the base pass of each window for later calls, and serves it to them; `keep`
    {condition: identity} names the conditions it keeps and serves too, by an identity the caller vouches for (the
    same identity, the same edit of the same model: "broken 11:507:1229", a patch's digest)."""

    share_below: int | dict[str, int] = 0
    progress: Callable[[int], None] | None = None
    observe: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None
    batch_tokens: int = 2048
    chunk_bytes: int = CHUNK_BUDGET
    subsets: dict[str, int] | None = None
    passes: Passes | None = None
    keep: dict[str, str] | None = None


@torch.no_grad()
def measure(
    model: nn.Module,
    ids: torch.Tensor,
    conditions: dict[str, Intervention] | None = None,
    channels: list[tuple[int, int]] = (),
    max_length: int = 512,
    stride: int | None = None,
    bos: Bos = NO_BOS,
    scoring: Scoring | None = None,
) -> dict[str, Metrics]:
    """Metrics for the base model and each condition over `ids` (1-d token stream).

    `channels` lists (layer, row) residual channels whose max |activation| is reported (super activations).
    `bos` (io/corpora.Bos, a loaded model's `.bos`): the token that starts every window, if any; the first text
    token is then scored from it.
    `scoring` (Scoring): the shared lower blocks, the progress and observer callbacks, the batch and chunk sizes.

    Each batch runs the trunk once per condition and keeps only the final hidden states of the scored tokens;
    the head, log-softmax, NLL, KL and top-1 then run a chunk of tokens at a time (`Scoring.chunk_bytes`).
    """
    scoring = scoring or Scoring()
    share_below, progress = scoring.share_below, scoring.progress
    conditions = dict(conditions or {})
    if "base" in conditions:
        raise ValueError("'base' is reserved for the model with no intervention")
    device = input_device(model)
    blocks = decoder_layers(model)
    if ids.numel() < 2:
        raise UsageError(f"need at least 2 tokens to score, got {ids.numel()}")
    n_layers = len(blocks)
    for layer, _row in channels:
        if not 0 <= layer < n_layers:
            raise UsageError(f"channel layer {layer} out of range: the model has {n_layers} layers")
        if isinstance(share_below, int) and layer < share_below:
            raise ValueError(f"channel layer {layer} lies below share_below={share_below}: its blocks are skipped")
    check_context(model, min(max_length, ids.numel()), max_length)
    shares = share_below if isinstance(share_below, dict) else dict.fromkeys(conditions, share_below)
    shares = {name: shares.get(name, 0) for name in conditions}
    prefixes = {layer: Prefix(model, layer) for layer in {0, *shares.values()}}
    wins = make_windows(ids.numel(), max_length, stride, bos=bos)
    accs = {name: _Acc() for name in ["base", *conditions]}
    head = head_of(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    # Kept per batch: every condition's final states [tokens, D] (with a head), or the whole fp32 log-probs
    # [tokens, V] of two passes at a time (without); both held near chunk_bytes.
    width = model.get_output_embeddings().weight.shape[1] * (len(accs)) if head is not None else vocab * LIVE_COPIES
    batch_tokens = min(scoring.batch_tokens, max(1, scoring.chunk_bytes // (width * 4)))
    chunk = chunk_tokens(vocab, scoring.chunk_bytes)
    watched = {(layer, row): blocks[layer] for layer, row in channels}
    limits, keep = scoring.subsets or {}, scoring.keep or {}
    if "base" in keep.values():
        raise ValueError("'base' is the base pass's own identity in Passes")
    cuts = sorted(set(limits.values()))
    done, snaps = 0, {}
    for batch in _batches(wins, batch_tokens, cuts):
        input_ids = with_bos(torch.stack([ids[w.begin : w.end] for w in batch]), bos)
        length = input_ids.shape[1]
        targets = torch.arange(1, length) - int(bos.on)  # text position of each target
        mask = torch.stack([targets + w.begin >= w.score_from for w in batch])
        labels = input_ids[:, 1:][mask].to(device)
        mask = None if bool(mask.all()) else mask.to(device)
        keys = [tuple(row.tolist()) for row in input_ids] if scoring.passes is not None else []  # read on the host
        input_ids = input_ids.to(device)
        with part("base"):  # block 0's input is not reused (core/prefix.Prefix.reuse): no need to capture it
            states = {"base": _scored(_kept_pass(model, head, input_ids, "base", (
                watched, accs["base"].act, scoring.passes, keys), {k: p for k, p in prefixes.items() if k}), mask)}
        if head is None:  # whole log-probs: score base now, then each condition as it comes; keep only base's
            _score(accs, states, labels, scoring.observe)
        for name, intervention in conditions.items():
            if name in limits and done >= limits[name]:
                continue
            prefix, kept = prefixes[shares[name]], scoring.passes if name in keep else None
            above = {at: block for at, block in watched.items() if at[0] >= shares[name]}  # the blocks it runs
            with intervention, prefix.reuse(prefix.hidden), part(name):
                states[name] = _scored(_kept_pass(model, head, input_ids, keep.get(name), (
                    above, accs[name].act, kept, keys), {}), mask)
            if head is None:
                _score(accs, {"base": states["base"], name: states.pop(name)}, labels, scoring.observe, first=False)
        if head is not None:
            for lo in range(0, labels.numel(), chunk):
                hi = min(lo + chunk, labels.numel())
                chunks = ((k, head(v[lo:hi]).float().log_softmax(-1)) for k, v in states.items())  # one at a time
                _score(accs, chunks, labels[lo:hi], scoring.observe)
        if progress:
            progress(labels.numel())
        done += labels.numel()
        snaps |= {n: {k: a.copy() for k, a in accs.items() if k not in limits} for n in cuts
                  if n not in snaps and done >= n}
    for name, layer in shares.items():  # channels below a condition's shared blocks: the base's values
        for c_layer, row in channels:
            if c_layer < layer and f"{c_layer}:{row}" in accs["base"].act:
                accs[name].act[f"{c_layer}:{row}"] = accs["base"].act[f"{c_layer}:{row}"]
    results = {name: acc.result() for name, acc in accs.items()}
    for n in cuts:
        results |= {f"{k}@{n}": a.result() for k, a in snaps.get(n, {k: a for k, a in accs.items()
                                                                        if k not in limits}).items()}
    return results


def _score(accs, lps, labels, observe, first: bool = True) -> None:
    """Add one chunk's NLL, top-1 agreement and KL(base || condition) to the accumulators. `lps`: (name, fp32
    log-probs [n, V]) pairs of the same tokens, base first, made one at a time when a generator; base's own sums
    are added when `first`."""
    lps = iter(lps.items() if isinstance(lps, dict) else lps)
    _, base_lp = next(lps)
    if first:
        _nll(accs["base"], base_lp, labels)
        if observe:
            observe("base", base_lp, labels)
    base_top = base_p = None
    for name, lp in lps:
        if base_p is None:
            base_top, base_p = base_lp.argmax(-1), base_lp.exp()  # shared by every condition's KL
        acc = accs[name]
        _nll(acc, lp, labels)
        acc.agree.append((lp.argmax(-1) == base_top).sum())
        if observe:
            observe(name, lp, labels)
        # KL(base || cond) = sum_v p_base (log p_base - log p_cond), per token, clamped at 0 (rounding can leave a
        # tiny negative). The difference is taken elementwise (in place: lp is not needed again) so tiny KLs,
        # e.g. of control ablations, survive; the expanded form sum(p log p) - dot(p, lp) loses them.
        acc.kl.append(lp.neg_().add_(base_lp).mul_(base_p).sum(-1).clamp_min_(0).sum())
        del lp


def _nll(acc: _Acc, lp, labels) -> None:
    acc.nll.append(-lp.gather(-1, labels[:, None]).sum())
    acc.n += labels.numel()


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model was built for (config.max_position_embeddings), None if unknown."""
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_context(model: nn.Module, length: int, given: int | None = None, option: str = "--max-length") -> None:
    """Refuse windows of `length` tokens longer than the model's context: positions past it score garbage
    silently. `given` is the option's value when the window is shorter than it (few tokens)."""
    context = context_length(model)
    if context is not None and length > context:
        given = length if given is None else given
        raise UsageError(f"{option} {given} is longer than the model's context ({context} tokens, "
                         f"max_position_embeddings): use {option} {context} or less")


def n_scored(n_tokens: int, max_length: int, stride: int | None = None, bos: Bos = NO_BOS) -> int:
    """How many targets `measure` scores for a stream of n_tokens (for progress totals)."""
    return sum(w.n_scored for w in make_windows(n_tokens, max_length, stride, bos=bos))


def tokens_fed(n_tokens: int, max_length: int, stride: int | None = None, bos: Bos = NO_BOS) -> int:
    """How many tokens one `measure` pass over a stream of n_tokens feeds the model (BOS included): the unit of
    the cost account (core/cost.py), times the decoder layers."""
    return sum(w.end - w.begin + int(bos.on) for w in make_windows(n_tokens, max_length, stride, bos=bos))


def protocol_of(loaded, corpus: str, split: str, n_tokens: int, max_length: int, stride: int,
                interventions: dict[str, str]) -> Protocol:
    """The protocol of a measurement on a loaded model (`models.Loaded`), stamped with provenance. With a BOS
    (`loaded.bos`) a window holds max_length - 1 tokens of text, so the stride recorded is at most that (what
    `measure` uses)."""
    if loaded.bos.on:
        stride = min(stride, max_length - 1)
    return Protocol(
        model=model_id(loaded), model_source=loaded.source, corpus=corpus, split=split, n_tokens=n_tokens,
        max_length=max_length, stride=stride, dtype=loaded.dtype, device=loaded.device,
        dtype_reason=loaded.dtype_reason, device_map=loaded.device_map,
        bos=loaded.bos.token, interventions=interventions, provenance=provenance(),
    )
