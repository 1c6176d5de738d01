"""Scale one weight through a list of factors (and the seed's "spread") and watch the damage.

    result = run_sweep(loaded, WeightCoord(layer=11, row=507, col=1229), SweepConfig(scales=[1, 0.5, 0, -1, 2]))
    result.points[1].metrics.ppl           # the weight halved; report/plots.save_sweep_plot draws them all
"""

from __future__ import annotations


from pydantic import BaseModel, Field

from superweight.core.arch import down_projection
from superweight.core.conditions import SPREAD, TIMES, descriptions, interventions
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, Spread
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.schema.record import Metrics, Protocol, SweepPoint
from superweight.measure import generate
from superweight.measure.metrics import Scoring, measure, n_scored, protocol_of
from superweight.progress import Progress, or_silent
from superweight.settings import Settings, revalidated


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
    where = {"row": coord.row, "col": coord.col, "where": dp.where}
    conds = [TIMES(Ablation(model, [revalidated(plain, scale=s)]), s=s, **where) for s in scales]
    if spread:
        conds.append(SPREAD(Spread(model, plain, spread), n=spread))
    conds = list({c.name: c for c in conds}.values())  # a scale given twice is measured once
    conditions = interventions(conds)
    if ids is None:
        ids = corpora.tokenize(tok, corpora.load_text(corpus, split), cfg.max_tokens)
    bos = loaded.bos
    progress.stage("Scoring tokens", n_scored(ids.numel(), max_length, bos=bos))
    results = measure(model, ids, conditions, [(coord.layer, coord.row)], max_length, bos=bos,
                      scoring=Scoring(progress=progress.advance))
    progress.stage("Generating", len(prompts))
    gens = generate.compare(model, tok, conditions, prompts, cfg.max_new_tokens, progress=progress.advance)
    points = [SweepPoint(label=c.name, scale=(TIMES.parse(c.name) or {}).get("s"), metrics=results[c.name])
              for c in conds]
    protocol = protocol_of(loaded, corpus, split, results["base"].n_tokens, max_length, max_length,
                           descriptions(conds))
    return SweepResult(protocol=protocol, weight=str(plain), value=dp.get(coord.row, coord.col).item(),
                       base=results["base"], points=points, generations=gens)
