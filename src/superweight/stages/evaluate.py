"""The eval job: base vs ablated (and patched) metrics on a corpus, greedy generations side by side, and
zero-shot task accuracies through lm-evaluation-harness when tasks are given (measure/tasks.py)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from superweight.core.conditions import ABLATED, PATCHED, ablated_text, descriptions, interventions
from superweight.core.coords import WeightCoord, row_text
from superweight.core.intervene import Ablation
from superweight.core.patching import PatchData, check_fits, patched
from superweight.display import Shown
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.io.record import Metrics, Protocol, TaskResults
from superweight.measure import generate
from superweight.measure.metrics import measure, protocol_of
from superweight.measure.tasks import TaskSpec, run_tasks


class EvalResult(Shown, BaseModel):
    protocol: Protocol
    base: Metrics
    ablated: Metrics | None
    patched: Metrics | None = None
    generations: list[dict[str, str]]
    tasks: TaskResults | None = None


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
    patch: PatchData | None = None,
    tasks: TaskSpec | None = None,
    on_task: Callable[[str], None] | None = None,
) -> EvalResult:
    """Measure the base model and the model with `coords` ablated (if any) on one corpus split; with `patch`
    (io.patchfile.load_patch) also the patched model; with `tasks` (measure.tasks.prepare_tasks) each
    condition's zero-shot task metrics."""
    model, tok = loaded.model, loaded.tokenizer
    stride = max_length if stride is None else stride
    ablation = Ablation(model, coords) if coords else None  # validates coordinates before any work
    conds = [ABLATED(ablation, weights=ablated_text(coords))] if ablation else []
    if patch is not None:
        check_fits(model, patch)
        conds.append(PATCHED(patched(model, patch.ablated, patch.rows, patch.vectors),
                             f"ablate {ablated_text(patch.ablated)}, add the patch on rows "
                             f"{', '.join(map(row_text, patch.rows))}"))
    conditions = interventions(conds)
    if ids is None:
        ids = corpora.tokenize(tok, corpora.load_text(corpus, split), max_tokens)
    channels = sorted({(c.layer, c.row) for c in coords})
    results = measure(model, ids, conditions, channels, max_length, stride, progress=on_tokens,
                      bos=getattr(loaded, "bos", None))
    gens = generate.compare(model, tok, conditions, prompts, max_new_tokens, progress=on_prompt)
    protocol = protocol_of(loaded, corpus, split, results["base"].n_tokens, max_length, stride, descriptions(conds))
    scores = run_tasks(loaded, tasks, conditions, on_condition=on_task) if tasks is not None else None
    return EvalResult(protocol=protocol, base=results["base"], ablated=results.get("ablated"),
                      patched=results.get("patched"), generations=gens, tasks=scores)
