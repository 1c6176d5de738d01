"""What the patch does, token by token and neuron by neuron: the views `analyze` adds to the record.

    stats = TokenStats(vocab)                  # pass as measure(..., observe=stats): per-target NLL and probabilities
    stats.summary(tokenizer, logit_lens(model, tokenizer, layer, row))   # Tokens: hurt, healed, rising, lens
    neuron_contexts(tokenizer, ids, x, positions, d, neurons)            # [Neuron]: where each neuron fires most
    patch_output(tokenizer, ids, x, positions, d, col, deleted)          # PatchOutput: where the patch writes most
    sweep_points(metrics, scales)                                        # [SweepPoint]: base, then scale{s}
"""

from __future__ import annotations

import torch
from torch import nn

from superweight.core.arch import final_norm
from superweight.core.conditions import SCALE
from superweight.schema.record import (
    Context, LensToken, LogitLens, Neuron, PatchOutput, SweepPoint, Tokens, TokenRise, TokenSum, WriteNeuron,
)

TOP_TOKENS = 15
CONTEXT_TOKENS = 12


class TokenStats:
    """Per-target NLL changes summed by token, and mean predicted probabilities, for base/broken/patched."""

    def __init__(self, vocab: int):
        self.nll: dict[str, list[torch.Tensor]] = {"base": [], "broken": [], "patched": []}
        self.prob = {name: torch.zeros(vocab, dtype=torch.float64) for name in self.nll}
        self.labels: list[torch.Tensor] = []

    def __call__(self, name: str, lp: torch.Tensor, labels: torch.Tensor) -> None:
        if name not in self.nll:
            return
        if name == "base":
            self.labels.append(labels.cpu())
        self.nll[name].append(-lp.gather(-1, labels[:, None])[:, 0].cpu())
        self.prob[name] += lp.exp().sum(0).double().cpu()

    def summary(self, tokenizer, lens: LogitLens) -> Tokens:
        labels = torch.cat(self.labels)
        nll = {k: torch.cat(v).double() for k, v in self.nll.items()}
        vocab = self.prob["base"].numel()
        counts = torch.bincount(labels, minlength=vocab)

        def by_token(delta: torch.Tensor) -> list[TokenSum]:
            sums = torch.zeros(vocab, dtype=torch.float64).index_add_(0, labels, delta)
            ranked = sums.masked_fill(counts == 0, -torch.inf)  # only tokens that occur (small vocabularies)
            top = ranked.topk(min(TOP_TOKENS, int((counts > 0).sum()))).indices.tolist()
            return [TokenSum(token=_tok(tokenizer, i), id=i, count=int(counts[i]), sum=sums[i].item(),
                             mean=sums[i].item() / int(counts[i])) for i in top]

        n = labels.numel()
        base_p, broken_p = self.prob["base"] / n, self.prob["broken"] / n
        delta = broken_p - base_p
        rising = [TokenRise(token=_tok(tokenizer, i), id=i, base_prob=base_p[i].item(),
                            broken_prob=broken_p[i].item(), delta=delta[i].item())
                  for i in delta.topk(TOP_TOKENS).indices.tolist()]
        return Tokens(n_tokens=n, hurt=by_token(nll["broken"] - nll["base"]),
                      healed=by_token(nll["broken"] - nll["patched"]), rising=rising, logit_lens=lens)


def _tok(tokenizer, i: int) -> str:
    return tokenizer.decode([i])


@torch.no_grad()
def logit_lens(model: nn.Module, tokenizer, layer: int, row: int, scale: float = 1.0) -> LogitLens:
    """Tokens a push along residual channel `row` promotes / demotes, read through final norm + unembedding.

    (lens(+e_row) - lens(-e_row)) / 2: the part odd in the push, so LayerNorm biases cancel."""
    norm, head = final_norm(model), model.get_output_embeddings()
    p = next(head.parameters())
    e = torch.zeros(1, 1, head.weight.shape[1], device=p.device, dtype=p.dtype)  # d_model
    e[..., row] = scale
    logits = ((head(norm(e)) - head(norm(-e))) / 2)[0, 0].float().cpu()

    def items(idx):
        return [LensToken(token=_tok(tokenizer, i), id=i, logit=logits[i].item()) for i in idx.tolist()]

    return LogitLens(layer=layer, row=row, top=items(logits.topk(TOP_TOKENS).indices),
                     bottom=items((-logits).topk(TOP_TOKENS).indices))


def _context(tokenizer, ids: torch.Tensor, g: int, pos: int) -> dict:
    return {"text": tokenizer.decode(ids[max(g - CONTEXT_TOKENS, g - pos) : g].tolist()),
            "token": _tok(tokenizer, int(ids[g])), "position": pos}


def neuron_contexts(tokenizer, ids, x: torch.Tensor, positions: list[int], vector: torch.Tensor,
                    neurons: list[int], n_contexts: int = 5) -> list[Neuron]:
    """For each neuron the patch reads, the positions of its largest |input| in `ids`, with the text before."""
    out = []
    for n in neurons:
        d = vector[n].item()
        contexts = []
        for g in x[:, n].abs().topk(min(n_contexts, x.shape[0])).indices.tolist():
            a = x[g, n].item()
            contexts.append(Context(**_context(tokenizer, ids, g, positions[g]), activation=a, contribution=a * d))
        out.append(Neuron(neuron=n, value=d, contexts=contexts))
    return out


def patch_output(tokenizer, ids, x: torch.Tensor, positions: list[int], vector: torch.Tensor,
                 col: int | None, deleted: float | None, top: int = 10) -> PatchOutput:
    """Where the patch writes: x @ d per token; at its largest, the context, what the ablation removed there
    (x[col] * deleted value) and the neurons that make up the write."""
    write = x @ vector.float()
    g = int(write.abs().argmax())
    parts = x[g] * vector.float()
    order = parts.abs().topk(min(top, parts.numel())).indices.tolist()
    return PatchOutput(
        **_context(tokenizer, ids, g, positions[g]),
        value=write[g].item(),
        median_abs=write.abs().median().item(),
        removed=x[g, col].item() * deleted if col is not None and deleted is not None else None,
        top_neurons=[WriteNeuron(neuron=n, x=x[g, n].item(), d=vector[n].item(), contribution=parts[n].item())
                     for n in order],
    )


def sweep_points(metrics: dict, scales, tokens: int | None = None) -> list[SweepPoint]:
    """The scale sweep from measure()'s results: base at scale 1, then each `scale{s}` condition. `tokens`: the
    scales were scored on a subset (Scoring.subsets), so base is read over the same tokens (`base@tokens`)."""
    return [SweepPoint(label="base", scale=1.0, metrics=metrics[f"base@{tokens}" if tokens else "base"])] + [
        SweepPoint(label=SCALE.name(s=s), scale=s, metrics=metrics[SCALE.name(s=s)]) for s in scales]
