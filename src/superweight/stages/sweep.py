"""Scale one weight through a list of factors (and the seed's "spread") and watch the damage.

    result = run_sweep(loaded, WeightCoord(layer=11, row=507, col=1229), scales=[1, 0.5, 0, -1, 2])
    result.points[1].metrics.ppl           # the weight halved; report/plots.save_sweep_plot draws them all
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, Field

from superweight.core.arch import down_projection
from superweight.core.conditions import SPREAD, TIMES, descriptions, interventions
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, Spread
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.io.record import Metrics, Protocol, SweepPoint
from superweight.measure import generate
from superweight.measure.metrics import measure, protocol_of


class SweepResult(BaseModel):
    protocol: Protocol
    weight: str
    value: float = Field(description="the weight's original value")
    base: Metrics
    points: list[SweepPoint]
    generations: list[dict[str, str]]


def run_sweep(
    loaded: Loaded,
    coord: WeightCoord,
    scales: list[float] = (1.0, 0.5, 0.0, -1.0, 2.0),
    spread: int | None = 8,
    corpus: str = corpora.DEFAULT_CORPUS,
    split: str = "eval",
    max_tokens: int = 4096,
    max_length: int = 512,
    prompts: list[str] | None = None,
    max_new_tokens: int = 20,
    ids=None,
    on_tokens: Callable[[int], None] | None = None,
    on_prompt: Callable[[int], None] | None = None,
) -> SweepResult:
    model, tok = loaded.model, loaded.tokenizer
    dp = down_projection(model, coord.layer, coord.expert)
    dp.check(coord.row, coord.col)
    plain = coord.model_copy(update={"scale": 0.0})
    where = {"row": coord.row, "col": coord.col, "where": dp.where}
    conds = [TIMES(Ablation(model, [plain.model_copy(update={"scale": s})]), s=s, **where) for s in scales]
    if spread:
        conds.append(SPREAD(Spread(model, plain, spread), n=spread))
    conds = list({c.name: c for c in conds}.values())  # a scale given twice is measured once
    conditions = interventions(conds)
    if ids is None:
        ids = corpora.tokenize(tok, corpora.load_text(corpus, split), max_tokens)
    results = measure(model, ids, conditions, [(coord.layer, coord.row)], max_length, progress=on_tokens,
                      bos=getattr(loaded, "bos", None))
    gens = generate.compare(model, tok, conditions, prompts, max_new_tokens, progress=on_prompt)
    points = [SweepPoint(label=c.name, scale=(TIMES.parse(c.name) or {}).get("s"), metrics=results[c.name])
              for c in conds]
    protocol = protocol_of(loaded, corpus, split, results["base"].n_tokens, max_length, max_length,
                           descriptions(conds))
    return SweepResult(protocol=protocol, weight=str(plain), value=dp.get(coord.row, coord.col).item(),
                       base=results["base"], points=points, generations=gens)
