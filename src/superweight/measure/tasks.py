"""Zero-shot tasks through lm-evaluation-harness on the loaded model, one condition at a time (`--tasks`).

    spec = prepare_tasks("arc_easy,piqa")                         # fails early: no harness, unknown task
    res = run_tasks(loaded, spec, {"ablated": Ablation(loaded.model, coords)})
    res.scores["ablated"]["arc_easy"]["acc"].value, res.scores["base"]["arc_easy"]["acc"].stderr

One model copy: the harness's `HFLM` wraps the loaded model itself, "base" runs with nothing applied, and each
other condition is applied in place around its own pass and removed after it (core/intervene). The harness gets
a copy of the tokenizer (it may set a pad token) and leaves the global RNG states as it found them.
`include_path` adds a folder of task YAML files (the harness's `--include_path`).
"""

from __future__ import annotations

import copy
import difflib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from superweight.core.intervene import Intervention, NoIntervention
from superweight.errors import SuperweightError, UsageError
from superweight.io.models import Loaded
from superweight.schema.record import TaskResults, TaskScore
from superweight.progress import Progress

INSTALL = "pip install -e '.[lm-eval]'"
SKIP = {"alias", "name", "sample_len", " "}  # entries of a task's result that are not metrics


def harness():
    """The lm_eval package, or one error line saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise SuperweightError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return lm_eval


@dataclass
class TaskSpec:
    """Checked task names and how to run them; `manager` is the harness's TaskManager that found them."""

    names: list[str]
    include_path: str | None = None
    limit: int | None = None
    batch_size: int = 16
    manager: object = field(default=None, repr=False)


def prepare_tasks(names: str | list[str], include_path: str | None = None, limit: int | None = None,
                  batch_size: int = 16) -> TaskSpec:
    """Parse comma-separated task names and find each in the harness (and `include_path`); before any model loads."""
    items = names.split(",") if isinstance(names, str) else names
    wanted = list(dict.fromkeys(n.strip() for n in items if n.strip()))
    if not wanted:
        raise UsageError("--tasks is empty: give task names, e.g. --tasks arc_easy,piqa")
    if include_path is not None and not Path(include_path).exists():
        raise UsageError(f"--include-path {include_path} does not exist")
    if limit is not None and limit < 1:
        raise UsageError(f"--task-limit must be at least 1, got {limit}")
    harness()
    from lm_eval.tasks import TaskManager

    with _quiet():
        # A local folder alone indexes in a blink; the harness's ~15,000 built-in tasks take ~10 s.
        manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
        if manager is None or not set(wanted) <= set(manager.all_tasks):
            manager = TaskManager(include_path=include_path)
    unknown = [n for n in wanted if n not in manager.all_tasks]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, 3) for n in unknown}
        said = "; ".join(f"{n}" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items())
        raise UsageError(f"unknown lm-eval task: {said}" + ("" if include_path else "; local YAML tasks need "
                                                              "--include-path DIR"))
    return TaskSpec(wanted, include_path, limit, batch_size, manager)


def run_tasks(loaded: Loaded, spec: TaskSpec, conditions: dict[str, Intervention],
              progress: Progress | None = None) -> TaskResults:
    """Every task of `spec` on "base" (nothing applied) and then under each condition, applied in place;
    `progress` (superweight.progress.Progress) hears of each condition as a stage."""
    lm_eval = harness()
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with _quiet():
        lm = HFLM(pretrained=loaded.model, tokenizer=copy.deepcopy(loaded.tokenizer), batch_size=spec.batch_size,
                  softmax_dtype="float32")
    scores, raw = {}, None
    for name, intervention in {"base": None, **conditions}.items():
        if progress is not None:
            progress.stage(f"lm-eval tasks: {name}", None)
        with _quiet(), _same_rng(), intervention or NoIntervention():
            try:
                raw = simple_evaluate(model=lm, tasks=spec.names, task_manager=spec.manager, limit=spec.limit,
                                      log_samples=False)
            except Exception as exc:  # the harness's own errors (a hub dataset offline, a broken YAML)
                first = (str(exc).strip().splitlines() or [""])[0]
                raise SuperweightError(f"lm-evaluation-harness failed on {', '.join(spec.names)} "
                                       f"({name}): {type(exc).__name__}: {first}") from exc
        scores[name] = {task: _metrics(res) for task, res in raw["results"].items()}
    tasks = {t: {"version": raw["versions"].get(t), "n_shot": raw["n-shot"].get(t),
                 "samples": (raw.get("n-samples", {}).get(t) or {}).get("effective")} for t in raw["n-shot"]}
    settings = {"limit": spec.limit, "include_path": spec.include_path, "batch_size": spec.batch_size,
                "softmax_dtype": "float32"}
    return TaskResults(harness=lm_eval.__version__, tasks=tasks, settings=settings, scores=scores)


def _metrics(result: dict) -> dict[str, TaskScore]:
    """{"acc,none": 0.8, "acc_stderr,none": 0.04} -> {"acc": TaskScore(0.8, 0.04)} (a filter other than none
    stays in the name: "exact_match,strict-match")."""
    out = {}
    for key, value in result.items():
        metric, _, filt = key.partition(",")
        if key in SKIP or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        err = result.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
        name = metric if filt in ("", "none") else key
        out[name] = TaskScore(value=float(value), stderr=float(err) if isinstance(err, (int, float)) else None)
    return out


class _quiet:
    """The harness's INFO/WARNING chatter (e.g. "pretrained model kwarg is not of type str") off, errors kept."""

    def __enter__(self):
        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


class _same_rng:
    """simple_evaluate seeds python, numpy and torch globally; put their states back afterwards."""

    def __enter__(self):
        import numpy as np

        self.states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()

    def __exit__(self, *exc):
        import numpy as np

        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.random.set_rng_state(self.states[2])
