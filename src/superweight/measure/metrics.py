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

from dataclasses import dataclass

import math
from collections.abc import Callable

import torch
from torch import nn

from superweight.core.arch import decoder_layers, input_device
from superweight.core.intervene import Intervention, Trace, hidden
from superweight.core.prefix import Prefix
from superweight.errors import UsageError
from superweight.io.corpora import NO_BOS, Bos, Window, windows as make_windows, with_bos
from superweight.io.models import model_id
from superweight.io.provenance import provenance
from superweight.io.record import Metrics, Protocol


class _Acc:
    """Running sums for one condition."""

    def __init__(self):
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.n = 0
        self.act: dict[str, float] = {}

    def result(self) -> Metrics:
        nll = self.nll / self.n
        acts = dict(sorted(self.act.items()))
        return Metrics(
            nll=nll,
            ppl=math.exp(min(nll, 700.0)),
            kl=max(self.kl / self.n, 0.0),
            top1_agree=self.agree / self.n,
            super_activation=max(acts.values()) if acts else None,
            super_activation_by_channel=acts,
            n_tokens=self.n,
        )


LOGIT_BUDGET = 512 * 2**20  # bytes of fp32 logits per batch (one window per batch at the least)


def _batches(wins: list[Window], batch_tokens: int) -> list[list[Window]]:
    """Group windows of equal length into batches of about `batch_tokens` tokens (no padding needed)."""
    out: list[list[Window]] = []
    for w in wins:
        length = w.end - w.begin
        if out and len(out[-1]) * length < batch_tokens and out[-1][0].end - out[-1][0].begin == length:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def _forward(model, input_ids, mask, channels, blocks, acc_act):
    """Scored-position log-probs [N, V] in fp32, recording super activations into `acc_act`."""

    def record(name, _inp, out):
        layer, row = name
        value = hidden(out)[..., row].detach().abs().max().item()
        key = f"{layer}:{row}"
        acc_act[key] = max(acc_act.get(key, 0.0), value)

    watched = {(layer, row): blocks[layer] for layer, row in channels}
    # Trace keys must be hashable names; tuples are fine for our own callback.
    with Trace(watched, record):
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    # Boolean indexing copies the [N, V] logits; skip it when every position is scored (the default).
    scored = logits.flatten(0, 1) if bool(mask.all()) else logits[mask]
    return scored.float().log_softmax(-1)


@dataclass(frozen=True)
class Scoring:
    """How `measure` runs its passes, and who watches them.

    `share_below=L` promises that no condition touches blocks below L: they run once per batch, in the base
    pass, and every condition starts from the base's hidden state at block L (`prefix.Prefix`).
    `progress(n)` is called after each batch with the number of tokens it covered.
    `observe(name, log_probs [N, V] fp32, labels [N])` sees every pass's scored log-probs ("base" first).
    `batch_tokens`: tokens per forward pass (capped so the logits stay near LOGIT_BUDGET)."""

    share_below: int = 0
    progress: Callable[[int], None] | None = None
    observe: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None
    batch_tokens: int = 2048


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
    `scoring` (Scoring): the shared lower blocks, the progress and observer callbacks, the batch size.
    """
    scoring = scoring or Scoring()
    share_below, progress, observe = scoring.share_below, scoring.progress, scoring.observe
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
        if layer < share_below:
            raise ValueError(f"channel layer {layer} lies below share_below={share_below}: its blocks are skipped")
    check_context(model, min(max_length, ids.numel()), max_length)
    prefix = Prefix(model, share_below)
    wins = make_windows(ids.numel(), max_length, stride, bos=bos)
    accs = {name: _Acc() for name in ["base", *conditions]}
    # A batch's logits are batch_tokens x vocab floats, several times over (base and condition log-probs, KL):
    # 2,048 x 49k (SmolLM2) is 0.4 GB, 2,048 x 262k (Gemma 3) 2.1 GB. Cap them near LOGIT_BUDGET.
    vocab = model.get_output_embeddings().weight.shape[0]
    batch_tokens = min(scoring.batch_tokens, max(1, LOGIT_BUDGET // (vocab * 4)))
    for batch in _batches(wins, batch_tokens):
        input_ids = with_bos(torch.stack([ids[w.begin : w.end] for w in batch]), bos).to(device)
        length = input_ids.shape[1]
        targets = torch.arange(1, length) - int(bos.on)  # text position of each target
        mask = torch.stack([targets + w.begin >= w.score_from for w in batch]).to(device)
        labels = input_ids[:, 1:][mask]
        with prefix.capture():
            base_lp = _forward(model, input_ids, mask, channels, blocks, accs["base"].act)
        _accumulate(accs["base"], base_lp, labels, agree=labels.numel())
        if observe:
            observe("base", base_lp, labels)
        if conditions:
            base_top = base_lp.argmax(-1)
            base_p = base_lp.exp()  # shared by every condition's KL
        for name, intervention in conditions.items():
            with intervention, prefix.reuse(prefix.hidden):
                lp = _forward(model, input_ids, mask, channels, blocks, accs[name].act)
            _accumulate(accs[name], lp, labels, agree=(lp.argmax(-1) == base_top).sum().item())
            if observe:
                observe(name, lp, labels)
            # KL(base || cond) = sum_v p_base (log p_base - log p_cond). The difference is taken elementwise
            # (in place: lp is not needed again) so tiny KLs, e.g. of control ablations, survive; the
            # expanded form sum(p log p) - dot(p, lp) loses them to cancellation.
            accs[name].kl += lp.neg_().add_(base_lp).mul_(base_p).sum().item()
        if progress:
            progress(int(mask.sum()))
    return {name: acc.result() for name, acc in accs.items()}


def _accumulate(acc: _Acc, lp, labels, agree: int) -> None:
    acc.nll += -lp.gather(-1, labels[:, None]).sum().item()
    acc.agree += agree
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
