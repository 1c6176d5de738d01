"""Find super weights: spike scan, iterate, rank by attribution, and confirm each by the damage it does.

1. Spike scan (Yu et al. 2024): hooks on every down-projection over a few prompts. Per layer, the largest
   |output| channel gives the row; at that token, the largest contribution |W[row, c] * x[c]| gives the col
   (usually also the largest |input| channel, which is the paper's rule; both are reported).
2. A layer is a candidate when its output spike stands `spike_ratio` times above the median over layers (a
   relative rule, not the paper's absolute |value| > 50). Zero the strongest, rescan, repeat: later super
   weights show once earlier ones are gone, and massive activations that merely propagate vanish.
3. Attribution, for architectures whose spikes hide (post-norm Gemma): score every weight by
   `|W[r,c]| * max_t |x_t[c]|` over calibration text (or first-order `|w * dL/dw|`), take the top few.
4. Verification: zero each candidate alone and measure KL(base || ablated) and the PPL ratio on a
   calibration slice, beside two controls from the same matrix: the other weight that writes most
   (|W[r,c]| * max_t |x_t[c]|), and a random weight. `confirmed` needs KL >= `min_kl` and >= `control_factor` x
   the worse control.
5. Grade (`grade`): what the damage makes of the weight, by the thresholds in measure/grade.py: a super weight
   (removal collapses the model), a sensitive weight (above its controls, but the model survives), or none.
6. Mixture of experts: each expert's down-projection is scanned and verified like a dense one (LAYER:EXPERT:ROW:COL),
   and a candidate's whole expert is also pruned beside two control experts, graded by the same thresholds, with
   how often the router picks it at the massive-activation tokens (stages/experts.py).

Every score is a property of the function, not of the parametrization: KL and the rankings by output spikes and
contributions |W[r,c] x[c]| do not change under core/reparam.py's three symmetries (tests/test_reparam.py checks);
reported `in_value` / `in_col` (the paper's largest-input rule), `value` (W itself) and sizes follow the scale.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator
from torch import nn

from superweight.core.arch import DownProj, down_projection, down_projections, input_device
from superweight.core.cost import part
from superweight.core.conditions import CANDIDATE, RANDOM_CONTROL, TOP_CONTROL
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, Trace
from superweight.display import Shown
from superweight.errors import UsageError
from superweight.io import corpora
from superweight.schema.detect import Candidate
from superweight.schema.record import Metrics, Protocol
from superweight.measure.grade import grade
from superweight.measure.inputs import input_maxima
from superweight.measure.metrics import Scoring, measure, n_scored, protocol_of
from superweight.progress import Progress, or_silent
from superweight.settings import Settings, revalidated
from superweight.stages.experts import EXPERT_PRUNING, plan_experts

DEFAULT_PROMPTS = [
    "Apple Inc. is a worldwide tech company.",  # the paper's prompt
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Tokyo is the capital of Japan.",
    "def add(a, b):\n    return a + b",
]


class LayerSpike(BaseModel):
    layer: int
    in_value: float = Field(description="max |input| of the down-projection (an intermediate activation)")
    in_col: int = Field(description="the d_ff column (neuron) holding that max")
    out_value: float = Field(description="max |output| of the down-projection")
    out_row: int = Field(description="the d_model row (residual channel) holding that max")
    position: int = Field(description="token position of the output max")
    prompt: int = Field(description="index of the prompt that gave the output max")
    col: int = Field(description="argmax_c |W[row,c] * x[c]| at that token: the weight that wrote the spike")
    share: float = Field(description="that weight's contribution / the output value at the spike")
    in_at_col: float = Field(description="max |input| at column `col` over the prompt's tokens")
    expert: int | str | None = Field(None, description="in a mixture of experts: the expert (index or 'shared') "
                                                        "whose down-projection wrote the spike")


class DetectResult(Shown, BaseModel):
    protocol: Protocol | None = Field(None, description="how the verification numbers were measured")
    settings: dict
    rounds: list[list[LayerSpike]] = Field(description="per scan round, the per-layer spikes")
    candidates: list[Candidate] = Field(description="ranked by KL (damage) when verified, else by discovery")
    published: list[dict] = Field(default_factory=list, description="published coordinates and if found")
    field_meanings: dict[str, str] = Field(default_factory=dict)


@torch.no_grad()
def scan(model: nn.Module, tokenizer, prompts: list[str]) -> list[LayerSpike]:
    """Per-layer spike statistics of every down-projection over the prompts (maxima over all prompts). In a
    mixture of experts each expert's down-projection is scanned (its routed input, core/moe.py: what it adds to
    the block's output) and the layer's spike is the largest of its experts'."""
    dps = down_projections(model)
    best: dict[int, LayerSpike] = {}
    device = input_device(model)
    for p_index, prompt in enumerate(prompts):
        def record(i, inp, out, p_index=p_index):
            dp = dps[i]
            # [T, d_ff] and [T, d_model] of the single sequence (OPT flattens batch and time before fc2).
            xs = dp.inputs(inp)
            x = xs.reshape(-1, xs.shape[-1]).float()
            ys = dp.outputs(xs, out)
            y = ys.reshape(-1, ys.shape[-1]).float()
            flat = y.abs().argmax().item()
            pos, row = divmod(flat, y.shape[1])
            contrib = dp.matrix[row].float() * x[pos]
            col = contrib.abs().argmax().item()
            xin = x.abs().max(0).values
            spike = LayerSpike(
                layer=dp.layer, in_value=xin.max().item(), in_col=xin.argmax().item(),
                out_value=y[pos, row].abs().item(), out_row=row, position=pos, prompt=p_index,
                col=col, share=(contrib[col] / y[pos, row]).item() if y[pos, row] != 0 else 0.0,
                in_at_col=xin[col].item(), expert=dp.expert,
            )
            old = best.get(dp.layer)
            if old is None or spike.out_value > old.out_value:
                best[dp.layer] = spike
            elif spike.in_value > old.in_value:
                best[dp.layer] = revalidated(old, in_value=spike.in_value, in_col=spike.in_col)

        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        with Trace(dict(enumerate(dp.module for dp in dps)), record):
            model(input_ids=ids, use_cache=False)
    return [best[i] for i in sorted(best)]


def spike_ratios(spikes: list[LayerSpike]) -> list[float]:
    """Each layer's output spike over the median of all layers' output spikes."""
    median = statistics.median(s.out_value for s in spikes)
    return [s.out_value / max(median, 1e-12) for s in spikes]


def iterate_spikes(
    model: nn.Module, tokenizer, prompts: list[str], spike_ratio: float = 50.0, max_candidates: int = 8,
) -> tuple[list[Candidate], list[list[LayerSpike]]]:
    """Scan, take the strongest outlier layer's weight, zero it, rescan; until nothing stands out."""
    found: list[Candidate] = []
    rounds: list[list[LayerSpike]] = []
    while len(found) < max_candidates:
        with Ablation(model, [c.coord for c in found]):
            spikes = scan(model, tokenizer, prompts)
        rounds.append(spikes)
        ratios = spike_ratios(spikes)
        known = {c.coord.key for c in found}
        outliers = [(r, s) for r, s in zip(ratios, spikes)
                    if r >= spike_ratio and WeightCoord(layer=s.layer, row=s.out_row, col=s.col, expert=s.expert).key
                    not in known]
        if not outliers:
            break
        ratio, s = max(outliers, key=lambda t: t[0])
        found.append(Candidate(
            layer=s.layer, row=s.out_row, col=s.col, expert=s.expert,
            value=down_projection(model, s.layer, s.expert).get(s.out_row, s.col).item(),
            source=f"spike (round {len(rounds)})", in_spike=s.in_at_col, out_spike=s.out_value,
            spike_ratio=ratio,
        ))
    return found, rounds



def attribution(
    model: nn.Module, ids: torch.Tensor, method: str = "activation", top: int = 3, max_length: int = 512,
    bos: corpora.Bos = corpora.NO_BOS,
) -> list[Candidate]:
    """The `top` weights over all down-projections by attribution score on the token stream `ids` (in rows that
    start with `bos`, when given).

    activation: |W[r,c]| * max_t |x_t[c]| (cheap; no gradients). gradient: |W[r,c] * dL/dW[r,c]| with L the
    mean next-token NLL (one backward pass; estimates the first-order loss change of zeroing the weight).
    """
    dps = down_projections(model)
    if method == "activation":  # |W| * max|x| one projection at a time (MoE: GBs)
        scores = (dp.matrix.detach().float().abs() * x.to(dp.matrix.device)[None, :]
                  for dp, x in zip(dps, input_maxima(model, ids, dps, max_length, bos)))
    elif method == "gradient":
        batch = corpora.pack(ids, min(max_length, ids.numel() + bos.on), bos)
        scores = _gradient_scores(model, dps, batch.to(input_device(model)))
    else:
        raise ValueError(f"unknown attribution method '{method}': use activation or gradient")
    out = []
    for dp, s in zip(dps, scores):  # each down-projection's top few, then the best of those overall
        values, index = s.flatten().topk(min(top, s.numel()))
        for v, i in zip(values.tolist(), index.tolist()):
            row, col = divmod(i, dp.d_ff)
            out.append(Candidate(layer=dp.layer, row=row, col=col, expert=dp.expert, value=dp.get(row, col).item(),
                                 source=f"attribution:{method}", attribution=v))
    return sorted(out, key=lambda c: -c.attribution)[:top]


def _gradient_scores(model, dps: list[DownProj], batch) -> list[torch.Tensor]:
    weights = list({id(dp.weight): dp.weight for dp in dps}.values())  # the experts of a layer share one tensor
    grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        for seq in batch:
            loss = model(input_ids=seq[None], labels=seq[None], use_cache=False).loss / len(batch)
            for g, gw in zip(grads, torch.autograd.grad(loss, weights)):
                g += gw.float()
    finally:
        for w in weights:
            w.requires_grad_(False)
    score = {id(w): (w.detach().float() * g).abs() for w, g in zip(weights, grads)}
    return [dp.view(score[id(dp.weight)]) for dp in dps]


def _controls(dp: DownProj, xmax: torch.Tensor, exclude: set[tuple[int, int]],
              seed: int) -> tuple[WeightCoord, WeightCoord]:
    """(the other weight of the matrix that writes most, |W[r,c]| * max_t |x_t[c]|, and a random weight), both
    outside `exclude`. Ranking by what a weight writes, not by |W|, keeps the control the same weight when the
    model is rescaled without changing its function (`core/reparam.py`): |W| alone follows the scale."""
    scores = (dp.matrix.detach().float().abs() * xmax.to(dp.matrix.device)[None, :]).flatten()
    k = min(len(exclude) + 1, scores.numel())
    top = next(
        divmod(i, dp.d_ff) for i in scores.topk(k).indices.tolist() if divmod(i, dp.d_ff) not in exclude
    )
    gen = torch.Generator().manual_seed(seed + dp.layer)
    while True:
        i = int(torch.randint(scores.numel(), (1,), generator=gen))
        rand = divmod(i, dp.d_ff)
        if rand not in exclude:
            break
    return (WeightCoord(layer=dp.layer, row=top[0], col=top[1], expert=dp.expert),
            WeightCoord(layer=dp.layer, row=rand[0], col=rand[1], expert=dp.expert))


def verify(model: nn.Module, ids: torch.Tensor, candidates: list[Candidate], cfg: DetectConfig | None = None,
           bos: corpora.Bos = corpora.NO_BOS, progress: Callable[[int], None] | None = None) -> tuple[list[Candidate], Metrics]:
    """Measure each candidate's damage beside its matrix's controls (and, inside an expert, its whole expert's
    beside control experts), with cfg's max_length, seed, min_kl and control_factor; return them ranked by KL,
    and base. `bos` (io/corpora.Bos): the token every window starts with, if any; `progress` is
    told of each scored token."""
    cfg = cfg or DetectConfig()
    min_kl, control_factor, max_length, seed = cfg.min_kl, cfg.control_factor, cfg.max_length, cfg.seed
    cand_by_matrix: dict[tuple, set[tuple[int, int]]] = {}
    for c in candidates:
        cand_by_matrix.setdefault((c.layer, c.expert), set()).add((c.row, c.col))
    conditions = {CANDIDATE.name(coord=c.coord): Ablation(model, [c.coord]) for c in candidates}
    # Each zeroed weight leaves the blocks below its layer as they are: those run once, in the base pass.
    shares = {CANDIDATE.name(coord=c.coord): c.layer for c in candidates}
    controls: dict[tuple, list[str]] = {}
    dps = [down_projection(model, layer, expert) for layer, expert in cand_by_matrix]
    maxima = input_maxima(model, ids, dps, max_length, bos)  # the windows `measure` reads
    for ((layer, expert), exclude), dp, xmax in zip(cand_by_matrix.items(), dps, maxima):
        top, rand = _controls(dp, xmax, exclude, seed)
        controls[(layer, expert)] = [str(top), str(rand)]
        conditions[TOP_CONTROL.name(layer=layer, expert=expert)] = Ablation(model, [top])
        conditions[RANDOM_CONTROL.name(layer=layer, expert=expert)] = Ablation(model, [rand])
        shares[TOP_CONTROL.name(layer=layer, expert=expert)] = shares[RANDOM_CONTROL.name(layer=layer, expert=expert)] = layer
    experts = plan_experts(model, ids, candidates, max_length, bos, seed)
    conditions.update(experts.conditions)
    results = measure(model, ids, conditions, max_length=max_length, bos=bos,
                      scoring=Scoring(share_below=shares, progress=progress))
    base = results["base"]
    out = []
    for c in candidates:
        m = results[CANDIDATE.name(coord=c.coord)]
        top_kl = results[TOP_CONTROL.name(layer=c.layer, expert=c.expert)].kl
        rand_kl = results[RANDOM_CONTROL.name(layer=c.layer, expert=c.expert)].kl
        confirmed = m.kl >= min_kl and m.kl >= control_factor * max(top_kl, rand_kl)
        out.append(revalidated(c, **{
            "kl": m.kl, "ppl_ratio": m.ppl / base.ppl, "control_kl_top": top_kl, "control_kl_random": rand_kl,
            "confirmed": confirmed, "controls": controls[(c.layer, c.expert)],
            "grade": grade(m.kl, m.ppl / base.ppl, max(top_kl, rand_kl), confirmed, control_factor),
            **experts.result(c, results, min_kl, control_factor),
        }))
    return sorted(out, key=lambda c: -c.kl), base


def merge(*groups: list[Candidate]) -> list[Candidate]:
    """Candidates in order, each coordinate once (the first occurrence wins, later ones add their scores)."""
    seen: dict[tuple, Candidate] = {}
    for group in groups:
        for c in group:
            key = c.coord.key
            if key not in seen:
                seen[key] = c
            elif c.attribution is not None and seen[key].attribution is None:
                seen[key] = revalidated(seen[key], attribution=c.attribution)
    return list(seen.values())


def field_meanings() -> dict[str, str]:
    return {name: f.description or "" for name, f in Candidate.model_fields.items() if f.description}


class DetectConfig(Settings):
    """Detection settings (`superweight detect`'s options; the defaults are the command's), checked when made:
    a number out of range is a ValidationError, an unknown attribution a UsageError."""

    prompts: list[str] | None = Field(None, description="scan prompts (None: the paper's + 3, DEFAULT_PROMPTS)")
    max_candidates: int = Field(8, ge=1, description="most spike-scan rounds (one weight each)")
    spike_ratio: float = Field(50.0, gt=0, description="a layer is an outlier when its output spike is this many "
                                                       "times the median layer's")
    attribution: Literal["activation", "gradient"] | None = Field(
        "activation", description="activation (|W|*max|x|), gradient (|w*dL/dw|) or None/'none' (spike scan only)")
    attribution_top: int = Field(3, ge=0, description="attribution candidates to verify")
    verify: bool = Field(True, description="measure each candidate's damage vs controls")
    corpus: str = Field(corpora.DEFAULT_CORPUS, description="calibration corpus")
    split: str = Field("train", description="calibration split")
    calib_tokens: int = Field(2048, ge=2, description="calibration tokens for attribution and verification")
    max_length: int = Field(512, ge=2, description="window length in tokens")
    min_kl: float = Field(0.1, ge=0, description="least KL (nats/token) for a confirmed super weight")
    control_factor: float = Field(10.0, gt=0, description="confirmed KL must be this many times the worse control's")
    seed: int = Field(0, description="seed of the random control weights")

    @field_validator("attribution", mode="before")
    @classmethod
    def _attribution(cls, v):
        if v not in (None, "none", "activation", "gradient"):
            raise UsageError(f"unknown attribution '{v}': use activation, gradient or none")
        return None if v == "none" else v


def run_detect(loaded, cfg: DetectConfig | None = None, ids: torch.Tensor | None = None,
               progress: Progress | None = None) -> DetectResult:
    """The whole detection job: iterate spikes, add attribution candidates, verify, rank.

    `ids`: calibration tokens already read (else `cfg.calib_tokens` of `cfg.corpus`/`cfg.split`); `progress`
    (superweight.progress.Progress) hears of each stage and of each token verification scores."""
    from superweight.known import published

    cfg = cfg or DetectConfig()
    model, tok = loaded.model, loaded.tokenizer
    bos = loaded.bos
    progress = or_silent(progress)
    stage = progress.stage
    prompts = cfg.prompts or DEFAULT_PROMPTS
    stage("Scanning spikes")
    with part("scan"):
        spikes, rounds = iterate_spikes(model, tok, prompts, cfg.spike_ratio, cfg.max_candidates)
    if (cfg.verify or cfg.attribution) and ids is None:
        ids = corpora.tokenize(tok, corpora.load_text(cfg.corpus, cfg.split), cfg.calib_tokens)
    attributed: list[Candidate] = []
    if cfg.attribution:
        stage(f"Attribution ({cfg.attribution})")
        with part("attribution"):
            attributed = attribution(model, ids, cfg.attribution, cfg.attribution_top, cfg.max_length, bos)
    candidates = merge(spikes, attributed)
    protocol = None
    if cfg.verify and candidates:
        stage(f"Verifying {len(candidates)} candidates", n_scored(ids.numel(), cfg.max_length, bos=bos))
        with part("verify"):
            candidates, base = verify(model, ids, candidates, cfg, bos, progress.advance)
        pruned = {"each candidate's expert": EXPERT_PRUNING} if any(c.expert is not None for c in candidates) else {}
        protocol = protocol_of(loaded, cfg.corpus, cfg.split, base.n_tokens, cfg.max_length, cfg.max_length,
                               {"each candidate": "zeroed alone", "controls": "zeroed alone", **pruned})
    found = {c.coord.key: c for c in candidates}
    known = [
        {**c.model_dump(exclude={"scale", "expert"} - ({"expert"} if c.expert is not None else set())),
         "detected": c.key in found,
         "confirmed": bool(found.get(c.key) and found[c.key].confirmed)}
        for c in published(loaded.spec)
    ]
    keys = {"spike_ratio", "max_candidates", "attribution", "attribution_top", "verify", "min_kl", "control_factor",
            "seed"}
    settings = {"prompts": prompts, **cfg.model_dump(include=keys)}
    return DetectResult(protocol=protocol, settings=settings, rounds=rounds, candidates=candidates,
                        published=known, field_meanings=field_meanings())
