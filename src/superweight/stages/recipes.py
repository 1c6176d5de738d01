"""The repair's training settings: `RepairConfig` (defined with the record it is kept in, io/trainrecord.py) and
the named recipes, and how a recipe with options on top is named in the record.

    cfg = recipe_settings("lbfgs", steps=100)    # RECIPES["lbfgs"] with steps=100, validated
    recipe_label("lbfgs", cfg)                   # "lbfgs+steps=100": what actually ran (the record's `recipe`)

docs/recipes.md measures each recipe; stages/train.py is the engine that runs one.
"""

from __future__ import annotations

from superweight.errors import UsageError
from superweight.io.trainrecord import RepairConfig
from superweight.settings import build

__all__ = ["RECIPES", "RepairConfig", "recipe_label", "recipe_settings"]

RECIPES: dict[str, RepairConfig] = {
    # The write-up's settings: AdamW lr 1e-3 (weight decay 0.01), batch 2 x 128 tokens, 404 steps.
    "seed": RepairConfig(
        steps=404, batch_size=2, seq_len=128, lr=1e-3, weight_decay=0.01, optimizer="adamw", schedule="constant",
        train_tokens=404 * 2 * 128, data="lines",
    ),
    # docs/recipes.md: Adam(W) at lr 0.1 (100x the seed's) with cosine decay, batch 4 x 128, 80 steps (1/5 of
    # the seed's) over 16k tokens (4 epochs, so the teacher is computed once and cached) reaches ~93% NLL-gap
    # recovery on the embedded model. lr 1e-2 reached only 32% in 40 steps: Adam moves each entry ~lr a step
    # and the patch must grow to norm ~50.
    "fast": RepairConfig(),
    # Made for the one-shot `superweight run` (5 minutes on 2 cores, two trainings with the other-row baseline),
    # its default before `balanced`: 32 steps of batch 2 x 128 over 4k tokens (2 epochs) at lr 0.3. On the
    # embedded model 96.0% NLL-gap recovery in ~33 s, where 40 steps of batch 4 at lr 0.1 gave 89% in ~80 s:
    # small batches and a higher lr win here (docs/recipes.md). Untested on larger models.
    "quick": RepairConfig(steps=32, batch_size=2, lr=0.3, train_tokens=4096),
    # `quick` with SGD (momentum 0.9) at lr 0.1: 99.5% on the embedded model, and the patch is the deleted
    # weight's direction (cos(d, e_col) 0.95, norm 5) where Adam's is not (0.04, norm 67): Adam moves every entry
    # ~lr a step, SGD in proportion to its gradient. SGD's lr depends on the activation scale (x ~ 3,000 at the
    # massive token here), so check it on each model; lr 1e-3 barely moves, 3e-2 gives 93%.
    "sgd": RepairConfig(steps=32, batch_size=2, lr=0.1, optimizer="sgd", train_tokens=4096),
    # The default of `repair` and `run` before `lbfgs`: `sgd`'s budget (32 steps of batch 2 x 128), SGD with
    # momentum in the balanced coordinates (stages/precondition.py), so the result is the same at every
    # function-preserving rescaling of the MLP: 99.7% on the embedded model at every scale where `quick` ranges
    # from -90% to 100% (benchmarks/bench_transfer.py, docs/recipes.md). lr 0.3: 0.1 under-trains the super
    # neuron (n = 1.72, so its steps are 3x smaller than in weight units: 92.7%); 3.0 overshoots (the loss
    # bounces back from 0.002).
    "balanced": RepairConfig(steps=32, batch_size=2, lr=0.3, optimizer="sgd", space="balanced", train_tokens=4096),
    # The default of `repair` and `run` (docs/recipes.md): L-BFGS with a strong-Wolfe line search on 4 fixed rows
    # of 128 tokens (16 loss evaluations, as first made: the same 64 row passes as `balanced`), in column coordinates
    # (d_j = u_j ‖W[:, j]‖: the same path under neuron, residual-stream and norm-gain rescaling). The line
    # search only takes steps that lower the loss, and the curvature pairs set the step size per direction, so
    # no lr needs finding: 99.99% on the embedded model and 99% (KL) on Gemma-3-270M, where `balanced` diverges.
    # It stops on progress, not on a count: once the last 8 evaluations lowered the best loss by less than 2% of
    # the first loss (the ablation's damage on these rows), or where the loss stops moving, 64 at most: 8
    # evaluations on the embedded model (restoration), 12 with its deleted column held at 0 (compensation), 21 on
    # Gemma-3-270M. A rule relative to the current loss (3% over 8) ran Gemma's restoring repair past 29 (its loss
    # falls toward 0 by ~5% an evaluation), and at 1% the embedded model's compensating one to 43, where the loss
    # on its 4 rows fell from 0.186 to 0.174 and ‖d‖ grew from 12 to 80 without moving the eval recovery (94.4%
    # against 94.7% at 15): fitting the rows, not repairing (docs/measurements.md).
    "lbfgs": RepairConfig(steps=64, batch_size=4, lr=1.0, optimizer="lbfgs", space="column", train_tokens=4096,
                          progress_tol=0.02),
}


def recipe_settings(name: str, prefix: str = "", **overrides) -> RepairConfig:
    """RECIPES[name] with `overrides` of its fields, validated (a bad value names the field as prefix + name)."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe '{name}': use {', '.join(RECIPES)}")
    return build(RepairConfig, RECIPES[name], prefix, **overrides)


def recipe_label(name: str, cfg: RepairConfig) -> str:
    """The recipe that ran, as the record names it: `name` alone when `cfg` is RECIPES[name], else `name` and
    each field that differs, in field order: "lbfgs+steps=100", "balanced+lr=0.5+seed=3". A name that is no
    recipe (a config of one's own) is kept as given, with every field that differs from the defaults."""
    base = RECIPES.get(name, RepairConfig())
    changed = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
               for k, v in cfg.model_dump().items() if v != getattr(base, k)]
    return "+".join([name, *changed])


def recipe_name(label: str) -> str:
    """The recipe a label starts from ("lbfgs+steps=100" -> "lbfgs")."""
    return label.split("+", 1)[0]
