"""Scale one weight through a list of factors (and the seed's "spread") and watch the damage.

    result = run_sweep(loaded, WeightCoord(layer=11, row=507, col=1229), SweepConfig(scales=[1, 0.5, 0, -1, 2]))
    plot(result, "sweep.png")
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, Intervention, Spread
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.measure import generate
from superweight.io.record import Metrics, Protocol
from superweight.measure.metrics import Scoring, measure, n_scored, protocol_of
from superweight.progress import Progress, or_silent
from superweight.settings import Settings, revalidated


class SweepPoint(BaseModel):
    label: str = Field(description="condition name: x<scale> or spread<n>")
    scale: float | None = Field(description="factor the weight was multiplied by (None for spread)")
    metrics: Metrics


class SweepResult(BaseModel):
    protocol: Protocol
    weight: str
    value: float = Field(description="the weight's original value")
    base: Metrics
    points: list[SweepPoint]
    generations: list[dict[str, str]]


class SweepConfig(Settings):
    """What `superweight sweep` measures (its defaults), checked when made."""

    scales: list[float] = Field([1.0, 0.5, 0.0, -1.0, 2.0], min_length=1, description="factors the weight is scaled by")
    spread: int | None = Field(8, ge=0, description="also zero it and add value/N to the next N columns (None/0: skip)")
    corpus: str = corpora.DEFAULT_CORPUS
    split: str = "eval"
    max_tokens: int = Field(4096, ge=2, description="tokens of the corpus to score")
    max_length: int = Field(512, description="window length in tokens")
    prompts: list[str] | None = Field(None, description="generation prompts (None: ten built-in)")
    max_new_tokens: int = Field(20, ge=1, description="greedy tokens per generation")

    def model_post_init(self, _ctx) -> None:
        corpora.check_windows(self.max_length)


def run_sweep(loaded: Loaded, coord: WeightCoord, cfg: SweepConfig | None = None, ids=None,
              progress: Progress | None = None) -> SweepResult:
    """Scale `coord` by each of cfg.scales (and spread it), scoring each on the same tokens (`ids`, else
    cfg.max_tokens of cfg.corpus/cfg.split) and generating from cfg.prompts; `progress` hears of both."""
    cfg = cfg or SweepConfig()
    scales, spread, corpus, split, max_length = cfg.scales, cfg.spread, cfg.corpus, cfg.split, cfg.max_length
    prompts = cfg.prompts or generate.DEFAULT_PROMPTS
    progress = or_silent(progress)
    model, tok = loaded.model, loaded.tokenizer
    dp = down_projection(model, coord.layer, coord.expert)
    dp.check(coord.row, coord.col)
    plain = revalidated(coord, scale=0.0)
    conditions: dict[str, Intervention] = {f"x{s:g}": Ablation(model, [revalidated(plain, scale=s)]) for s in scales}
    if spread:
        conditions[f"spread{spread}"] = Spread(model, plain, spread)
    if ids is None:
        ids = corpora.tokenize(tok, corpora.load_text(corpus, split), cfg.max_tokens)
    bos = getattr(loaded, "bos", None)
    progress.stage("Scoring tokens", n_scored(ids.numel(), max_length, bos=bos is not None))
    results = measure(model, ids, conditions, [(coord.layer, coord.row)], max_length, bos=bos,
                      scoring=Scoring(progress=progress.advance))
    progress.stage("Generating", len(prompts))
    gens = generate.compare(model, tok, conditions, prompts, cfg.max_new_tokens, progress=progress.advance)
    points = [
        SweepPoint(label=name, scale=float(name[1:]) if name.startswith("x") else None, metrics=results[name])
        for name in conditions
    ]
    protocol = protocol_of(
        loaded, corpus, split, results["base"].n_tokens, max_length, max_length,
        {
            **{f"x{s:g}": f"W[{coord.row},{coord.col}] of {dp.where} times {s:g}" for s in scales},
            **({f"spread{spread}": f"zero it, add value/{spread} to the next {spread} columns"} if spread else {}),
        },
    )
    return SweepResult(protocol=protocol, weight=str(plain), value=dp.get(coord.row, coord.col).item(),
                       base=results["base"], points=points, generations=gens)


def plot(result: SweepResult, path: str | Path) -> Path:
    """PPL (log scale) and KL against scale; spread drawn as horizontal dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = sorted((p for p in result.points if p.scale is not None), key=lambda p: p.scale)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [p.scale for p in pts]
    ax.plot(xs, [p.metrics.ppl for p in pts], "o-", color="tab:blue", label="PPL")
    ax.axhline(result.base.ppl, color="tab:blue", lw=0.8, alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel(f"scale of W = {result.value:.4g} at {result.weight}")
    ax.set_ylabel("perplexity", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, [p.metrics.kl for p in pts], "s--", color="tab:red", label="KL(base||·)")
    ax2.set_ylabel("KL(base || scaled), nats/token", color="tab:red")
    for p in result.points:
        if p.scale is None:
            ax.axhline(p.metrics.ppl, color="tab:blue", ls=":", label=f"{p.label} PPL")
            ax2.axhline(p.metrics.kl, color="tab:red", ls=":", label=f"{p.label} KL")
    pr = result.protocol
    ax.set_title(f"{pr.model.split(' ')[0]}: {pr.corpus}/{pr.split}, {pr.n_tokens} tokens", fontsize=9)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
