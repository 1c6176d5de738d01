"""The training parts of the run record: `config` (RepairConfig, the training settings, re-exported by
stages/recipes.py beside the named recipes) and `training` (written by stages/train.py: steps, time and the
held-out check). Beside io/record.py, which imports them; docs/results.md says what each key means."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from superweight.errors import UsageError
from superweight.io.recordbase import Record


class RepairConfig(Record):
    """Training settings, recorded as the run record's `config`; stages/recipes.RECIPES holds the named presets.
    Checked where it is made (a bad value is one UsageError line); unknown fields are an error."""

    steps: int = Field(80, description="optimiser steps")
    batch_size: int = Field(4, description="sequences per step")
    seq_len: int = Field(128, description="tokens per sequence")
    lr: float = Field(0.1, description="learning rate")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    optimizer: Literal["adamw", "adam", "sgd", "lbfgs"] = Field(
        "adamw", description="lbfgs: quasi-Newton with a strong-Wolfe line search on a fixed set of batch_size "
                             "rows; `steps` counts loss evaluations, lr scales its first step")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="lr schedule (cosine decays to 0)")
    warmup: int = Field(0, description="linear warm-up steps")
    kl: Literal["forward", "reverse"] = Field("forward", description="forward: KL(teacher||student)")
    temperature: float = Field(1.0, description="softmax temperature (loss scaled by T^2)")
    init: Literal["zero", "random"] = Field("zero", description="initial patch")
    seed: int = 0
    train_tokens: int = Field(16384, description="tokens of the training split to draw sequences from")
    teacher_cache_mb: int = Field(
        2048, description="cache teacher log-probs (fp16) and prefix states across epochs when they fit"
    )
    space: Literal["weight", "balanced", "column"] = Field(
        "weight", description="coordinates the optimiser works in: weight (d itself), balanced (d_j = u_j / n_j, "
                              "the same at every rescaling of the MLP's neurons) or column (d_j = u_j ‖W[:, j]‖, "
                              "the same under neuron, residual-stream and norm-gain rescaling); stages/precondition.py"
    )
    check_rows: int = Field(
        2, description="rows of the train split held out to check the patch: the best one checked is kept, and "
                       "training backs off when the patch does worse than none (0: no check)")
    progress_tol: float = Field(
        0.0, description="lbfgs: stop once the last 8 loss evaluations lowered the best loss by less than this "
                         "fraction of the first loss (0: run to `steps`, which always caps the evaluations)")
    data: Literal["packed", "lines"] = Field(
        "packed", description="packed: the train split cut into full seq_len rows (no padding); lines: one "
                              "wikitext line per sequence, right-padded and masked (the seed write-up's; "
                              "wikitext2 only, other corpora are packed)"
    )

    def model_post_init(self, _ctx) -> None:
        if self.check_rows < 0:
            raise UsageError(f"check-rows must be at least 0, got {self.check_rows}")
        for name in ("steps", "batch_size", "seq_len", "train_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.progress_tol < 1:
            raise UsageError(f"progress-tol must be in [0, 1), got {self.progress_tol}")
        if self.lr <= 0 or self.temperature <= 0:
            raise UsageError("lr and temperature must be positive")


class Check(Record):
    """The held-out check of a training run: KL(intact || ablated + patch) on rows of the train split that
    training never sees. The patch handed over is the best one checked, so never worse than no patch there."""

    tokens: int = Field(description="scored tokens of the held-out rows")
    broken_kl: float = Field(description="KL with no patch (the ablated model)")
    best_kl: float = Field(description="KL of the patch handed over")
    best_step: int = Field(description="the step it was taken at (0: no patch beat the ablated model)")
    backoffs: int = Field(0, description="times the patch was worse than none and training went back to the best "
                                         "patch with a 5x smaller lr")


class Training(Record):
    steps: int = Field(description="optimiser steps (lbfgs: loss evaluations) run")
    seconds: float
    s_per_step: float
    final_loss: float | None = Field(description="last step's loss; null: resumed from an old checkpoint")
    resumed_from: int | None = None
    teacher_cached: bool
    check: Check | None = Field(None, description="the held-out check (null: too few training rows, or older runs)")
