"""The repair engine's settings: a discriminated union on `optimizer`, so that no setting exists for an optimiser
that would ignore it, and the named recipes.

    cfg = LbfgsConfig()                          # the default: what `superweight repair` runs (RECIPES["lbfgs"])
    cfg = FirstOrderConfig(optimizer="sgd", steps=32, lr=0.1)
    cfg = configure(cfg, "--", optimizer="lbfgs", budget=20)   # switch engines: the shared settings carry over
    cfg = recipe_settings("lbfgs", budget=100)   # RECIPES["lbfgs"] with 100 loss evaluations at most
    recipe_label("lbfgs", cfg)                   # "lbfgs+max_evals=100": what ran (the record's `recipe`)
    LbfgsConfig(warmup=5)                        # a ValidationError: lbfgs has no warm-up

Two words have one meaning each here. A *sequence* is one row of training tokens ([seq_len] ids); a *row* is a
patched row of a down-projection (`rows` of `engine.train.train`). The *budget* is what a run may spend, in loss
evaluations (one forward and backward pass over a batch): a first-order run spends one per optimiser step
(`steps`), an L-BFGS run spends `max_evals`, line-search trials included.

Persisted with the record (`config`), config.json and patch_config.json, and checked against a checkpoint on
resume. Files written before the union (one flat RepairConfig: `steps` for both engines, `check_rows`, schedule
and warm-up fields that lbfgs ignored) are lifted by `upgrade_config`, which the readers of each file call.
docs/recipes.md measures each recipe; engine/train.py runs one.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, TypeAdapter, ValidationError

from superweight.errors import UsageError
from superweight.schema.base import Record
from superweight.settings import error_line


class _Shared(Record):
    """The settings both engines read: data, loss, space and the held-out check."""

    batch_size: int = Field(4, description="sequences per step (lbfgs: the fixed sequences it fits)")
    seq_len: int = Field(128, description="tokens per sequence")
    lr: float = Field(0.1, description="learning rate")
    kl: Literal["forward", "reverse"] = Field("forward", description="forward: KL(teacher||student)")
    temperature: float = Field(1.0, description="softmax temperature (loss scaled by T^2)")
    init: Literal["zero", "random"] = Field("zero", description="initial patch")
    seed: int = 0
    train_tokens: int = Field(16384, description="tokens of the training split to draw sequences from")
    teacher_cache_mb: int = Field(
        2048, description="cache teacher log-probs (fp16) and prefix states across epochs when they fit"
    )
    space: Literal["weight", "balanced", "column"] = Field(
        "weight", description="the space the optimiser works in: weight (d itself), balanced (d_j = u_j / n_j, "
                              "the same at every rescaling of the MLP's neurons) or column (d_j = u_j ‖W[:, j]‖, "
                              "the same under neuron, residual-stream and norm-gain rescaling); engine/patch.py"
    )
    check_sequences: int = Field(
        2, description="sequences of the train split held out to check the patch: the best one checked is kept, "
                       "and training backs off when the patch does worse than none (0: no check)")
    data: Literal["packed", "lines"] = Field(
        "packed", description="packed: the train split cut into full seq_len sequences (no padding); lines: one "
                              "wikitext line per sequence, right-padded and masked (the seed write-up's; "
                              "wikitext2 only, other corpora are packed)"
    )

    def model_post_init(self, _ctx) -> None:
        if self.check_sequences < 0:
            raise UsageError(f"check-sequences must be at least 0, got {self.check_sequences}")
        for name in (self.BUDGET, "batch_size", "seq_len", "train_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.temperature <= 0:
            raise UsageError("lr and temperature must be positive")

    BUDGET: ClassVar[str] = "steps"  # the field that holds the budget

    @property
    def budget(self) -> int:
        """Loss evaluations this config may spend (first-order: one per step)."""
        return getattr(self, self.BUDGET)


class LbfgsConfig(_Shared):
    """L-BFGS with a strong-Wolfe line search on a fixed set of batch_size sequences, where a line search means
    something (the objective does not change between trials). No schedule, warm-up or weight decay: the line
    search sets every step but the first, which `lr` scales. The default settings are the `lbfgs` recipe, the
    product's default."""

    BUDGET: ClassVar[str] = "max_evals"
    optimizer: Literal["lbfgs"] = "lbfgs"
    max_evals: int = Field(64, description="loss evaluations at most, line-search trials included")
    lr: float = Field(1.0, description="scales the first step only (along -gradient)")
    space: Literal["weight", "balanced", "column"] = Field("column", description=_Shared.model_fields["space"].description)
    train_tokens: int = Field(4096, description="tokens of the training split to draw sequences from")
    progress_tol: float = Field(
        0.02, description="stop once the last 8 loss evaluations lowered the best loss by less than this fraction "
                          "of the first loss (0: run to max_evals, which always caps the evaluations)")
    done_tol: float = Field(
        0.01, description="stop once the best loss is at most this fraction of the first loss: the patch has "
                          "removed all but that share of the damage on its sequences (0: never)")

    def model_post_init(self, _ctx) -> None:
        super().model_post_init(_ctx)
        for name in ("progress_tol", "done_tol"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")


class FirstOrderConfig(_Shared):
    """SGD (momentum 0.9), Adam or AdamW: one step per fresh batch, `steps` of them, with an lr schedule."""

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    steps: int = Field(80, description="optimiser steps (one loss evaluation each)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="lr schedule (cosine decays to 0)")
    warmup: int = Field(0, ge=0, description="linear warm-up steps")


RepairConfig = Annotated[LbfgsConfig | FirstOrderConfig, Field(discriminator="optimizer")]
_ADAPTER: TypeAdapter = TypeAdapter(RepairConfig)
OPTIMIZERS = ("lbfgs", "adamw", "adam", "sgd")


def parse_config(data: dict) -> LbfgsConfig | FirstOrderConfig:
    """The config a dict describes (its `optimizer` picks the class; without one, lbfgs)."""
    return _ADAPTER.validate_python({"optimizer": "lbfgs", **data})


def configure(base: LbfgsConfig | FirstOrderConfig | None = None, prefix: str = "",
              **changes) -> LbfgsConfig | FirstOrderConfig:
    """`base` (None: LbfgsConfig()) with `changes`, validated. `budget` sets the budget field of whichever
    engine results (steps or max_evals). Changing `optimizer` across engines keeps the shared settings and the
    budget; a change that the resulting engine does not have is one UsageError line naming it as prefix + name
    (`--warmup applies to the first-order optimizers ...`)."""
    base = base if base is not None else LbfgsConfig()
    optimizer = changes.get("optimizer", base.optimizer)
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"invalid {prefix}optimizer {optimizer!r}: use {', '.join(OPTIMIZERS)}")
    cls = LbfgsConfig if optimizer == "lbfgs" else FirstOrderConfig
    known = set(cls.model_fields) | {"budget"}
    unknown = sorted(set(changes) - set(LbfgsConfig.model_fields) - set(FirstOrderConfig.model_fields) - {"budget"})
    if unknown:
        raise TypeError(f"unknown RepairConfig setting(s): {', '.join(unknown)}")
    for name in changes:
        if name not in known:
            owner = "lbfgs" if name in LbfgsConfig.model_fields else "the first-order optimizers (adamw, adam, sgd)"
            raise UsageError(f"{prefix}{name.replace('_', '-') if prefix else name} applies to {owner}, "
                             f"not {optimizer}")
    fields = {k: v for k, v in dict(base).items() if k in cls.model_fields}
    if type(base) is not cls:  # across engines: the budget carries over, the engine's own settings start fresh
        fields = {k: v for k, v in fields.items() if k in _Shared.model_fields} | {cls.BUDGET: base.budget}
    if "budget" in changes:
        if isinstance(changes["budget"], int) and changes["budget"] < 1:  # the CLI's --steps
            raise UsageError(f"{prefix + 'steps' if prefix else 'budget'} must be at least 1, got {changes['budget']}")
        changes = {**{k: v for k, v in changes.items() if k != "budget"}, cls.BUDGET: changes["budget"]}
    try:
        return cls.model_validate({**fields, **changes})
    except ValidationError as exc:
        raise UsageError(error_line(exc, prefix)) from None


# The flat RepairConfig's defaults: a flat config without a key (written before the key existed) meant these.
FLAT_DEFAULTS = {"steps": 80, "batch_size": 4, "seq_len": 128, "lr": 0.1, "weight_decay": 0.0, "optimizer": "adamw",
                 "schedule": "cosine", "warmup": 0, "kl": "forward", "temperature": 1.0, "init": "zero", "seed": 0,
                 "train_tokens": 16384, "teacher_cache_mb": 2048, "space": "weight", "check_rows": 2,
                 "progress_tol": 0.0, "data": "packed"}


def upgrade_config(data, flat: bool | None = None):
    """A config as written before the union (one flat RepairConfig for every optimiser) in today's shape. `flat`:
    whether it is of that shape (a versioned file knows); None: told by its keys (a checkpoint: every flat one held
    `check_rows`), and one in today's shape is returned as it is. Missing keys take the flat model's defaults.
    lbfgs: `steps` counted loss evaluations, so it becomes `max_evals`, and the schedule, warm-up and weight decay
    it never read go; first-order: `progress_tol`, which it never read, goes. `check_rows` becomes
    `check_sequences`. An lbfgs config of either shape without `done_tol` was written before that rule: 0."""
    if not isinstance(data, dict):
        return data
    if flat if flat is not None else "check_rows" in data:
        data = {**FLAT_DEFAULTS, **data}  # its optimizer, when it names none, is the flat default's (adamw)
        data["check_sequences"] = data.pop("check_rows")
        if data["optimizer"] == "lbfgs":
            data["max_evals"] = data.pop("steps")
            for name in ("schedule", "warmup", "weight_decay"):
                data.pop(name)
        else:
            data.pop("progress_tol")
    if data.get("optimizer", "lbfgs") == "lbfgs" and "done_tol" not in data:  # the union's default optimizer
        data = {**data, "done_tol": 0.0}
    return data


RECIPES: dict[str, LbfgsConfig | FirstOrderConfig] = {
    # The write-up's settings: AdamW lr 1e-3 (weight decay 0.01), batch 2 x 128 tokens, 404 steps.
    "seed": FirstOrderConfig(
        steps=404, batch_size=2, seq_len=128, lr=1e-3, weight_decay=0.01, optimizer="adamw", schedule="constant",
        train_tokens=404 * 2 * 128, data="lines",
    ),
    # docs/recipes.md: Adam(W) at lr 0.1 (100x the seed's) with cosine decay, batch 4 x 128, 80 steps (1/5 of
    # the seed's) over 16k tokens (4 epochs, so the teacher is computed once and cached) reaches ~93% NLL-gap
    # recovery on the embedded model. lr 1e-2 reached only 32% in 40 steps: Adam moves each entry ~lr a step
    # and the patch must grow to norm ~50.
    "fast": FirstOrderConfig(),
    # Made for the one-shot `superweight run` (5 minutes on 2 cores, two trainings with the other-row baseline),
    # its default before `balanced`: 32 steps of batch 2 x 128 over 4k tokens (2 epochs) at lr 0.3. On the
    # embedded model 96.0% NLL-gap recovery in ~33 s, where 40 steps of batch 4 at lr 0.1 gave 89% in ~80 s:
    # small batches and a higher lr win here (docs/recipes.md). Untested on larger models.
    "quick": FirstOrderConfig(steps=32, batch_size=2, lr=0.3, train_tokens=4096),
    # `quick` with SGD (momentum 0.9) at lr 0.1: 99.5% on the embedded model, and the patch is the deleted
    # weight's direction (cos(d, e_col) 0.95, norm 5) where Adam's is not (0.04, norm 67): Adam moves every entry
    # ~lr a step, SGD in proportion to its gradient. SGD's lr depends on the activation scale (x ~ 3,000 at the
    # massive token here), so check it on each model; lr 1e-3 barely moves, 3e-2 gives 93%.
    "sgd": FirstOrderConfig(steps=32, batch_size=2, lr=0.1, optimizer="sgd", train_tokens=4096),
    # The default of `repair` and `run` before `lbfgs`: `sgd`'s budget (32 steps of batch 2 x 128), SGD with
    # momentum in the balanced space (engine/patch.py), so the result is the same at every function-preserving
    # rescaling of the MLP: 99.7% on the embedded model at every scale where `quick` ranges from -90% to 100%
    # (benchmarks/bench_transfer.py, docs/recipes.md). lr 0.3: 0.1 under-trains the super neuron (n = 1.72, so
    # its steps are 3x smaller than in weight units: 92.7%); 3.0 overshoots (the loss bounces back from 0.002).
    "balanced": FirstOrderConfig(steps=32, batch_size=2, lr=0.3, optimizer="sgd", space="balanced",
                                 train_tokens=4096),
    # The default of `repair` and `run` (docs/recipes.md), and LbfgsConfig's defaults: L-BFGS with a strong-Wolfe
    # line search on 4 fixed sequences of 128 tokens (16 loss evaluations, as first made: the same 64 sequence
    # passes as `balanced`), in the column space (d_j = u_j ‖W[:, j]‖: the same path under neuron,
    # residual-stream and norm-gain rescaling). The line search only takes steps that lower the loss, and the
    # curvature pairs set the step size per direction, so no lr needs finding: 99.99% on the embedded model and
    # 99% (KL) on Gemma-3-270M, where `balanced` diverges. It stops on what it has done, not on a count: once the
    # best loss is 1% of the first loss (the ablation's damage on these sequences) or less (done), once the last 8
    # evaluations lowered the best loss by less than 2% of the first (stalled), or where the loss stops moving, 64
    # at most: 4 evaluations on the embedded model (restoration; 99.2% NLL-gap, where running on to 8 gave
    # 99.99%), 12 with its deleted column held at 0 (compensation, which never gets near done), 15 on
    # Gemma-3-270M (21 without the done rule: the last 6 took its training KL from 99.1% to 99.5%). A rule relative to the current
    # loss (3% over 8) ran Gemma's restoring repair past 29 (its loss falls toward 0 by ~5% an evaluation), and
    # at 1% the embedded model's compensating one to 43, where the loss on its 4 sequences fell from 0.186 to
    # 0.174 and ‖d‖ grew from 12 to 80 without moving the eval recovery (94.4% against 94.7% at 15): fitting the
    # sequences, not repairing (docs/measurements.md).
    "lbfgs": LbfgsConfig(),
}


def recipe_settings(name: str, prefix: str = "", **overrides) -> LbfgsConfig | FirstOrderConfig:
    """RECIPES[name] with `overrides` (fields, or `budget`), validated (a bad one names prefix + name)."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe '{name}': use {', '.join(RECIPES)}")
    return configure(RECIPES[name], prefix, **overrides)


def recipe_label(name: str, cfg: LbfgsConfig | FirstOrderConfig) -> str:
    """The recipe that ran, as the record names it: `name` alone when `cfg` is RECIPES[name], else `name` and
    each field that differs, the budget first, then in field order: "lbfgs+max_evals=100", "balanced+lr=0.5+seed=3". A name that is no
    recipe (a config of one's own) is kept as given, with every field that differs from its engine's defaults."""
    base = RECIPES.get(name, type(cfg)())
    fields = cfg.model_dump()
    fields = {cfg.BUDGET: fields.pop(cfg.BUDGET), **fields}  # the budget first, as the flat config had `steps`
    changed = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
               for k, v in fields.items() if v != getattr(base, k, None)]
    return "+".join([name, *changed])


def recipe_name(label: str) -> str:
    """The recipe a label starts from ("lbfgs+max_evals=100" -> "lbfgs")."""
    return label.split("+", 1)[0]
