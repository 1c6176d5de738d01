"""What the stages of one run compute once and hand on (stages/pipeline.py builds one for `run`).

    shared = Shared(training_data(tok, corpus, cfg, bos), Passes())
    run_repair(loaded, coords, rows, out, job, progress, shared)     # trains on shared.data, keeps its eval passes
    without_deleted(loaded, out, record, tokens, progress, shared)   # the same targets, the same base pass
    run_analyze(loaded, out, cfg, progress, record, shared.passes)   # base, broken and patched read, not run
"""

from __future__ import annotations

from dataclasses import dataclass

from superweight.engine.objective import Sequences
from superweight.measure.metrics import Passes


@dataclass(frozen=True)
class Shared:
    """`data`: the training Sequences with the intact model's targets (engine/train.training_data), which every
    training on the same sequences reads; `passes`: the passes kept over the eval windows (measure/metrics.Passes).
    None: the stage makes its own (and keeps nothing for later)."""

    data: Sequences | None = None
    passes: Passes | None = None
