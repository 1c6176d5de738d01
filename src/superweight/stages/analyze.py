"""What the repair patch is, what it needs, and what it changes: measured on a run directory.

    record = run_analyze(loaded, Path("runs/x"))      # adds patch, sparsity, tokens, neurons, sweep, sinks, ...
    record.sparsity[0]                                # SparsityPoint(k=1, nll_gap=..., random=...)

Every measurement but one shares one base pass (`metrics.measure`, blocks below the patched layer run once per
batch): the broken and patched models, the top-k and random-k sparsified patches, and the scaled weight. The
mechanism view (`sinks`, measure/sinks.py) runs base, broken and patched again, with eager attention, on windows
of at most 256 tokens. The keys it adds to the run record are documented in docs/results.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from superweight.core.arch import final_norm
from superweight.core.coords import make_row, row_of, site, split_row
from superweight.core.intervene import Ablation, Compose, Intervention, RowPatch, intact_values
from superweight.core.prefix import first_edited_layer
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.io.patchfile import PatchData, check_fits, load_patch
from superweight.io.rundir import read_record, write_record
from superweight.measure.geometry import geometry
from superweight.measure.inputs import down_inputs, seen_ids
from superweight.io.record import Metrics, RunRecord
from superweight.measure.metrics import Scoring, measure, n_scored, protocol_of
from superweight.measure.recovery import recovery
from superweight.measure.sinks import WINDOW, sink_view
from superweight.progress import Progress, or_silent
from superweight.settings import Settings, revalidated

SWEEP_SCALES = (0.5, 0.0, -1.0, 2.0)
TOP_TOKENS = 15
CONTEXT_TOKENS = 12


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def keep_entries(vectors: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
    """The patch with only the entries at `keep` (indices into the concatenated vectors), the rest zero."""
    flat = torch.cat([v.detach().float().cpu() for v in vectors])
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return list(out.split([v.numel() for v in vectors]))


def sparsity_conditions(model, ablation: Ablation, patch: PatchData, draws: int, by_contribution: torch.Tensor,
                        seed: int = 0):
    """The patch cut to k entries, for k in 1, 2, 4, ..., n: "top{k}" keeps the k largest |d|, "contrib{k}" the
    k largest |x * d| at the token where the patch writes most, "rand{k}_{j}" k random ones (draw j)."""
    flat = torch.cat([v.float() for v in patch.vectors])
    orders = {"top": flat.abs().argsort(descending=True), "contrib": by_contribution.argsort(descending=True)}
    gen = torch.Generator().manual_seed(seed)
    conditions: dict[str, Intervention] = {}

    def cut(keep):
        return Compose(ablation, RowPatch(model, patch.rows, keep_entries(patch.vectors, keep)))

    for k in powers_of_two(flat.numel()):
        for name, order in orders.items():
            conditions[f"{name}{k}"] = cut(order[:k])
        if k < flat.numel():  # with every entry kept, random-k is the same patch
            for j in range(draws):
                conditions[f"rand{k}_{j}"] = cut(torch.randperm(flat.numel(), generator=gen)[:k])
    return conditions


def _scored(m: Metrics, base: Metrics, broken: Metrics) -> dict:
    rec = recovery(base, broken, m)
    return {"nll": m.nll, "ppl": m.ppl, "kl": m.kl, "nll_gap": rec.nll_gap, "kl_recovery": rec.kl}


def sparsity_table(metrics: dict[str, Metrics], n: int, draws: int) -> list[dict]:
    base, broken = metrics["base"], metrics["broken"]
    table = []
    for k in powers_of_two(n):
        top = _scored(metrics[f"top{k}"], base, broken)
        runs = [_scored(metrics[f"rand{k}_{j}"], base, broken) for j in range(draws)] if k < n else [top]
        random = {key: sum(r[key] for r in runs) / len(runs) for key in top}
        table.append({"k": k, **top, "by_contribution": _scored(metrics[f"contrib{k}"], base, broken),
                      "random": {**random, "draws": len(runs) if k < n else 0}})
    return table


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

    def summary(self, tokenizer) -> dict:
        labels = torch.cat(self.labels)
        nll = {k: torch.cat(v).double() for k, v in self.nll.items()}
        vocab = self.prob["base"].numel()
        counts = torch.bincount(labels, minlength=vocab)

        def by_token(delta: torch.Tensor) -> list[dict]:
            sums = torch.zeros(vocab, dtype=torch.float64).index_add_(0, labels, delta)
            ranked = sums.masked_fill(counts == 0, -torch.inf)  # only tokens that occur (small vocabularies)
            top = ranked.topk(min(TOP_TOKENS, int((counts > 0).sum()))).indices.tolist()
            return [{"token": _tok(tokenizer, i), "id": i, "count": int(counts[i]), "sum": sums[i].item(),
                     "mean": sums[i].item() / int(counts[i])} for i in top]

        n = labels.numel()
        base_p, broken_p = self.prob["base"] / n, self.prob["broken"] / n
        delta = broken_p - base_p
        rising = [{"token": _tok(tokenizer, i), "id": i, "base_prob": base_p[i].item(),
                   "broken_prob": broken_p[i].item(), "delta": delta[i].item()}
                  for i in delta.topk(TOP_TOKENS).indices.tolist()]
        return {"n_tokens": n, "hurt": by_token(nll["broken"] - nll["base"]),
                "healed": by_token(nll["broken"] - nll["patched"]), "rising": rising}


def _tok(tokenizer, i: int) -> str:
    return tokenizer.decode([i])


@torch.no_grad()
def logit_lens(model: nn.Module, tokenizer, layer: int, row: int, scale: float = 1.0) -> dict:
    """Tokens a push along residual channel `row` promotes / demotes, read through final norm + unembedding.

    (lens(+e_row) - lens(-e_row)) / 2: the part odd in the push, so LayerNorm biases cancel."""
    norm, head = final_norm(model), model.get_output_embeddings()
    p = next(head.parameters())
    e = torch.zeros(1, 1, head.weight.shape[1], device=p.device, dtype=p.dtype)  # d_model
    e[..., row] = scale
    logits = ((head(norm(e)) - head(norm(-e))) / 2)[0, 0].float().cpu()

    def items(idx):
        return [{"token": _tok(tokenizer, i), "id": i, "logit": logits[i].item()} for i in idx.tolist()]

    return {"layer": layer, "row": row, "top": items(logits.topk(TOP_TOKENS).indices),
            "bottom": items((-logits).topk(TOP_TOKENS).indices)}


def _context(tokenizer, ids: torch.Tensor, g: int, pos: int) -> dict:
    return {"text": tokenizer.decode(ids[max(g - CONTEXT_TOKENS, g - pos) : g].tolist()),
            "token": _tok(tokenizer, int(ids[g])), "position": pos}


def neuron_contexts(tokenizer, ids, x: torch.Tensor, positions: list[int], vector: torch.Tensor,
                    neurons: list[int], n_contexts: int = 5) -> list[dict]:
    """For each neuron the patch reads, the positions of its largest |input| in `ids`, with the text before."""
    out = []
    for n in neurons:
        d = vector[n].item()
        contexts = []
        for g in x[:, n].abs().topk(min(n_contexts, x.shape[0])).indices.tolist():
            a = x[g, n].item()
            contexts.append({**_context(tokenizer, ids, g, positions[g]), "activation": a, "contribution": a * d})
        out.append({"neuron": n, "value": d, "contexts": contexts})
    return out


def patch_output(tokenizer, ids, x: torch.Tensor, positions: list[int], vector: torch.Tensor,
                 col: int | None, deleted: float | None, top: int = 10) -> dict:
    """Where the patch writes: x @ d per token; at its largest, the context, what the ablation removed there
    (x[col] * deleted value) and the neurons that make up the write."""
    write = x @ vector.float()
    g = int(write.abs().argmax())
    parts = x[g] * vector.float()
    order = parts.abs().topk(min(top, parts.numel())).indices.tolist()
    return {
        **_context(tokenizer, ids, g, positions[g]),
        "value": write[g].item(),
        "median_abs": write.abs().median().item(),
        "removed": x[g, col].item() * deleted if col is not None and deleted is not None else None,
        "top_neurons": [{"neuron": n, "x": x[g, n].item(), "d": vector[n].item(), "contribution": parts[n].item()}
                        for n in order],
    }


def contribution_scores(model, ids, patch: PatchData, max_length: int,
                        bos: int | None = None) -> tuple[torch.Tensor, dict]:
    """|x[t, i] * d[i]| for every patch entry (rows concatenated), t the token where that row's write x @ d is
    largest; and the down-projection inputs per layer, for the token and neuron views (windows start with `bos`
    when given: x has a row per BOS too, see measure/inputs.seen_ids)."""
    inputs, scores = {}, []  # keyed by coords.site: the layer, or (layer, expert)
    for r, v in zip(patch.rows, patch.vectors):
        if site(r) not in inputs:
            inputs[site(r)] = down_inputs(model, ids, r[0], max_length, bos, split_row(r)[2])
        x = inputs[site(r)][0]
        t = int((x @ v.float()).abs().argmax())
        scores.append((x[t] * v.float()).abs())
    return torch.cat(scores), inputs


class AnalyzeConfig(Settings):
    """What `superweight analyze` measures (its defaults), checked when made."""

    tokens: int = Field(2048, ge=2, description="eval-split tokens to analyse on")
    draws: int = Field(3, ge=1, description="random-k control draws per k")
    max_length: int = Field(512, ge=2, description="window length in tokens")
    top_neurons: int = Field(5, ge=1, description="neurons shown in the neuron view")


def run_analyze(loaded: Loaded, run_dir: Path, cfg: AnalyzeConfig | None = None, progress: Progress | None = None,
                record: RunRecord | None = None) -> RunRecord:
    """Analyse the patch of `run_dir` on cfg.tokens eval tokens; writes and returns the updated record. `record`:
    the run's record when the caller holds it (the pipeline), else it is read from `run_dir`; `progress`
    (superweight.progress.Progress) hears of each view and of the scored tokens."""
    cfg = cfg or AnalyzeConfig()
    n_tokens, draws, max_length, top_neurons = cfg.tokens, cfg.draws, cfg.max_length, cfg.top_neurons
    progress = or_silent(progress)
    stage = progress.stage
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    record = record if record is not None else read_record(run_dir)
    patch = load_patch(run_dir)
    model, tok = loaded.model, loaded.tokenizer
    check_fits(model, patch)
    corpus = record.protocol.corpus
    bos = getattr(loaded, "bos", None)
    ids = corpora.tokenize(tok, corpora.load_text(corpus, "eval"), n_tokens)
    coords = patch.ablated
    originals = intact_values(model, coords)
    ablation = Ablation(model, coords)
    conditions: dict[str, Intervention] = {
        "broken": ablation, "patched": Compose(ablation, RowPatch(model, patch.rows, patch.vectors)),
    }
    stage("Reading the patch's inputs", None)
    by_contribution, inputs = contribution_scores(model, ids, patch, max_length, bos)
    conditions.update(sparsity_conditions(model, ablation, patch, draws, by_contribution))
    first = coords[0]
    sweep = {f"scale{s:g}": Ablation(model, [revalidated(first, scale=s)]) for s in SWEEP_SCALES}
    conditions.update(sweep)
    channels = sorted({(c.layer, c.row) for c in coords})
    share_below = first_edited_layer(coords, patch.rows)
    stats = TokenStats(model.get_output_embeddings().weight.shape[0])
    stage(f"Analysing: {len(conditions)} conditions", n_scored(ids.numel(), max_length, bos=bos is not None))
    metrics = measure(model, ids, conditions, channels, max_length, bos=bos,
                      scoring=Scoring(share_below=share_below, progress=progress.advance, observe=stats))
    base = metrics["base"]
    n = sum(v.numel() for v in patch.vectors)
    stage("Mechanism view: attention sinks", None)
    sinks = sink_view(model, ids, {"broken": conditions["broken"], "patched": conditions["patched"]},
                      (first.layer, first.row), bos, window=min(WINDOW, max_length))
    stage("Token and neuron views", None)
    (layer, row, _expert), vector = split_row(patch.rows[0]), patch.vectors[0].float()
    x, positions = inputs[site(patch.rows[0])]
    seen = seen_ids(ids, max_length, bos)  # the token of each row of x
    # The neurons that write most (RMS of x_j d_j over tokens): the same neurons however the MLP is scaled.
    neurons = (x * vector).pow(2).mean(0).topk(min(top_neurons, vector.numel())).indices.tolist()
    col, deleted = next(((c.col, w - w * c.scale) for c, w in zip(coords, originals)
                         if row_of(c) == make_row(*split_row(patch.rows[0]))), (None, None))
    analysis = {
        "patch": geometry(model, coords, patch.rows, patch.vectors, originals,
                          {key: xs for key, (xs, _) in inputs.items()}),
        "super_activation": {k: metrics[k].super_activation for k in ("base", "broken", "patched")},
        "sparsity": sparsity_table(metrics, n, draws),
        "tokens": {**stats.summary(tok), "logit_lens": logit_lens(model, tok, layer, row)},
        "neurons": neuron_contexts(tok, seen, x, positions, vector, neurons),
        "patch_output": patch_output(tok, seen, x, positions, vector, col, deleted),
        "sweep": [{"scale": 1.0, **_sweep_point(base)}]
                 + [{"scale": s, **_sweep_point(metrics[f"scale{s:g}"])} for s in SWEEP_SCALES],
        "sinks": sinks.model_dump(),
    }
    analysis["analysis"] = {
        "protocol": protocol_of(loaded, corpus, "eval", base.n_tokens, max_length, max_length, {
            "broken": f"ablate {', '.join(map(str, coords))}",
            "patched": "ablate, add the run's patch",
            "top{k}": "ablate, add the patch keeping its k largest-|d| entries",
            "contrib{k}": "ablate, add the patch keeping the k entries with the largest |x[i] * d[i]| at the token "
                          "where |x @ d| is largest (the massive-activation token)",
            "rand{k}_{j}": f"ablate, add the patch keeping k random entries (draw j of {draws})",
            "scale{s}": f"{first} multiplied by s (nothing else changed)",
        }),
        "draws": draws,
        "seconds": time.perf_counter() - t0,
    }
    record = RunRecord.model_validate(record.model_dump() | analysis)
    write_record(run_dir, record)
    return record


def _sweep_point(m: Metrics) -> dict:
    return {"nll": m.nll, "ppl": m.ppl, "kl": m.kl, "top1_agree": m.top1_agree,
            "super_activation": m.super_activation}  # ppl is finite: Metrics caps the exponent
