"""The training part of the run record: `training` (written by engine/train.py: the budget spent, time and the
held-out check). The record's `config`, the training settings, is engine/config.py's (LbfgsConfig |
FirstOrderConfig). Beside schema/record.py, which imports them; docs/results.md says what each key means."""

from __future__ import annotations

from pydantic import Field

from superweight.schema.base import Record


class Check(Record):
    """The held-out check of a training run: KL(intact || ablated + patch) on rows of the train split that
    training never sees. The patch handed over is the best one checked, so never worse than no patch there."""

    tokens: int = Field(description="scored tokens of the held-out sequences")
    broken_kl: float = Field(description="KL with no patch (the ablated model)")
    best_kl: float = Field(description="KL of the patch handed over")
    best_step: int = Field(description="the step it was taken at (0: no patch beat the ablated model)")
    backoffs: int = Field(0, description="first-order: times the patch was worse than none and training went back "
                                         "to the best patch with a 5x smaller lr (lbfgs: always 0, it does not "
                                         "train on from the best patch)")


class Training(Record):
    steps: int = Field(description="the budget spent, in loss evaluations: first-order optimiser steps (one "
                                   "each), lbfgs evaluations (config.steps / config.max_evals cap it)")
    seconds: float
    s_per_step: float
    final_loss: float | None = Field(description="last step's loss; null: resumed from an old checkpoint")
    resumed_from: int | None = None
    teacher_cached: bool
    check: Check | None = Field(None, description="the held-out check (null: too few training sequences, or older "
                                                  "runs)")
