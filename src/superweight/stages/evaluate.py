"""The eval job: base vs ablated (and patched) metrics on a corpus, greedy generations side by side, and
zero-shot task accuracies through lm-evaluation-harness when tasks are given (measure/tasks.py).

    result = run_eval(loaded, coords, EvalConfig(max_tokens=1024))
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, SkipValidation

from superweight.core.conditions import ABLATED, PATCHED, ablated_text, descriptions, interventions
from superweight.core.coords import WeightCoord, row_text
from superweight.core.intervene import Ablation
from superweight.core.patching import PatchData, check_fits, patched
from superweight.display import Shown
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.schema.record import Metrics, Protocol, TaskResults
from superweight.measure import generate
from superweight.measure.metrics import Scoring, measure, n_scored, protocol_of
from superweight.measure.tasks import TaskSpec, run_tasks
from superweight.progress import Progress, or_silent
from superweight.settings import Settings


class EvalResult(Shown, BaseModel):
    protocol: Protocol
    base: Metrics
    ablated: Metrics | None
    patched: Metrics | None = None
    generations: list[dict[str, str]]
    tasks: TaskResults | None = None


class EvalConfig(Settings):
    """What `superweight eval` measures (its defaults), checked when made."""

    corpus: str = corpora.DEFAULT_CORPUS
    split: str = "eval"
    max_tokens: int = Field(4096, ge=2, description="tokens of the corpus to score")
    max_length: int = Field(512, description="window length in tokens")
    stride: int | None = Field(None, description="window stride (None: max_length, no overlap)")
    prompts: list[str] | None = Field(None, description="generation prompts (None: ten built-in)")
    max_new_tokens: int = Field(20, ge=1, description="greedy tokens per generation")
    tasks: Annotated[TaskSpec | None, SkipValidation] = Field(
        None, description="lm-evaluation-harness tasks per condition (measure.tasks.prepare_tasks)")

    def model_post_init(self, _ctx) -> None:
        corpora.check_windows(self.max_length, self.stride)


def run_eval(loaded: Loaded, coords: list[WeightCoord], cfg: EvalConfig | None = None, ids=None,
             patch: PatchData | None = None, progress: Progress | None = None) -> EvalResult:
    """Measure the base model and the model with `coords` ablated (if any) on one corpus split, as `cfg` says
    (`ids`: its tokens already read); with `patch` (io.patchfile.load_patch) also the patched model; with
    `cfg.tasks` (measure.tasks.prepare_tasks) each condition's zero-shot task metrics. `progress` hears of the
    scored tokens, the generations and the tasks."""
    cfg = cfg or EvalConfig()
    corpus, split, max_length, tasks = cfg.corpus, cfg.split, cfg.max_length, cfg.tasks
    prompts = cfg.prompts or generate.DEFAULT_PROMPTS
    progress = or_silent(progress)
    model, tok = loaded.model, loaded.tokenizer
    stride = max_length if cfg.stride is None else cfg.stride
    ablation = Ablation(model, coords) if coords else None  # validates coordinates before any work
    conds = [ABLATED(ablation, weights=ablated_text(coords))] if ablation else []
    if patch is not None:
        check_fits(model, patch)
        conds.append(PATCHED(patched(model, patch.ablated, patch.rows, patch.vectors),
                             f"ablate {ablated_text(patch.ablated)}, add the patch on rows "
                             f"{', '.join(map(row_text, patch.rows))}"))
    conditions = interventions(conds)
    if ids is None:
        ids = corpora.tokenize(tok, corpora.load_text(corpus, split), cfg.max_tokens)
    channels = sorted({(c.layer, c.row) for c in coords})
    bos = loaded.bos
    progress.stage("Scoring tokens", n_scored(ids.numel(), max_length, stride, bos))
    results = measure(model, ids, conditions, channels, max_length, stride, bos,
                      Scoring(progress=progress.advance))
    progress.stage("Generating", len(prompts))
    gens = generate.compare(model, tok, conditions, prompts, cfg.max_new_tokens, progress=progress.advance)
    protocol = protocol_of(loaded, corpus, split, results["base"].n_tokens, max_length, stride, descriptions(conds))
    scores = run_tasks(loaded, tasks, conditions, progress) if tasks is not None else None
    return EvalResult(protocol=protocol, base=results["base"], ablated=results.get("ablated"),
                      patched=results.get("patched"), generations=gens, tasks=scores)
