"""The eval job: base vs ablated metrics on a corpus, plus greedy generations side by side."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.measure import generate
from superweight.io.record import Metrics, Protocol
from superweight.measure.metrics import measure, protocol_of


class EvalResult(BaseModel):
    protocol: Protocol
    base: Metrics
    ablated: Metrics | None
    generations: list[dict[str, str]]


def run_eval(
    loaded: Loaded,
    coords: list[WeightCoord],
    corpus: str = corpora.DEFAULT_CORPUS,
    split: str = "eval",
    max_tokens: int = 4096,
    max_length: int = 512,
    stride: int | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 20,
    ids=None,
    on_tokens: Callable[[int], None] | None = None,
    on_prompt: Callable[[int], None] | None = None,
) -> EvalResult:
    """Measure the base model and the model with `coords` ablated (if any) on one corpus split."""
    model, tok = loaded.model, loaded.tokenizer
    stride = max_length if stride is None else stride
    ablation = Ablation(model, coords) if coords else None  # validates coordinates before any work
    if ids is None:
        ids = corpora.tokenize(tok, corpora.load_text(corpus, split), max_tokens)
    conditions = {"ablated": ablation} if ablation else {}
    channels = sorted({(c.layer, c.row) for c in coords})
    results = measure(model, ids, conditions, channels, max_length, stride, progress=on_tokens)
    gens = generate.compare(model, tok, conditions, prompts, max_new_tokens, progress=on_prompt)
    protocol = protocol_of(
        loaded, corpus, split, results["base"].n_tokens, max_length, stride,
        {"ablated": "ablate " + ", ".join(map(str, coords))} if coords else {},
    )
    return EvalResult(protocol=protocol, base=results["base"], ablated=results.get("ablated"), generations=gens)
