"""The repair stage: data, training, baselines, evaluation, artifacts, and the run directory when there is one.

    job = RepairJob(recipe="fast", eval_tokens=512)          # validated here; the recipe's RepairConfig inside
    record, patch = run_repair(loaded, [coord], [(11, 507)], Path("runs/x"), job)
    record, patch = run_repair(loaded, [coord], [(11, 507)], None, job)     # in memory: nothing is written

With a run directory (io/rundir.RunDir) it writes config.json (schema/runconfig.RunConfig), train_log.jsonl,
checkpoints/last.pt, patch.safetensors + patch_config.json and results.json (base / broken / patched metrics,
recovery, training, baselines, patch geometry) there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, SkipValidation, field_validator, model_validator

from superweight.core.arch import down_projection
from superweight.core.conditions import (
    ACTIVATION_RESTORE, BROKEN, ORACLE, OTHER_ROW, PATCHED, RANDOM_WRITE, SEED, Condition, ablated_text, descriptions,
    interventions,
)
from superweight.core.cost import part
from superweight.core.coords import WeightCoord, make_row, row_of, row_text, site, split_row
from superweight.core.intervene import Ablation, ActivationRestore, Compose, RowPatch, intact_values
from superweight.core.patching import edit_identity, patched
from superweight.core.prefix import first_edited_layer
from superweight.errors import UsageError
from superweight.io import corpora
from superweight.io.models import Loaded, model_id
from superweight.core.patching import PatchData
from superweight.io.patchfile import as_patch_data, write_patch
from superweight.schema.compensation import Exclusion
from superweight.schema.record import Baseline, RunRecord, Seeds, SeedScores
from superweight.schema.runconfig import RunConfig
from superweight.io.rundir import RunDir
from superweight.measure import generate
from superweight.measure.geometry import geometry, rms
from superweight.measure.inputs import down_inputs, patch_inputs
from superweight.measure.metrics import Scoring, check_context, measure, protocol_of
from superweight.stages.shared import Shared
from superweight.measure.recovery import TokenNLL, nll_gap_interval, recovery_of, verdict_of
from superweight.measure.tasks import TaskSpec, run_tasks
from superweight.progress import Progress, or_silent
from superweight.settings import Settings, revalidated
from superweight.stages.account import own_account
from superweight.stages.exclusion import parse_excludes, ranking_needed, resolve, top_writers
from superweight.engine.config import RECIPES, RepairConfig, configure, recipe_label
from superweight.engine.train import Track, train, training_data


class RepairJob(Settings):
    """What a repair does besides training (the defaults are `superweight repair`'s); `config` is the recipe's
    RepairConfig unless given. Checked when made: a bad value is a ValidationError, an unknown recipe a
    UsageError."""

    recipe: str = Field("lbfgs", description="the named recipe (engine/config.RECIPES) the config starts from")
    config: RepairConfig = Field(None, description="the training settings (None: RECIPES[recipe])",
                                 validate_default=True)
    corpus: str = Field(corpora.DEFAULT_CORPUS, description="train split to train on, eval split to measure")
    eval_tokens: int = Field(4096, ge=2, description="eval-split tokens for the before/after metrics")
    max_length: int = Field(512, ge=2, description="window length of the before/after metrics")
    baselines: bool = Field(False, description="also the oracle, activation restore, random vectors, other row")
    seeds: int = Field(1, ge=1, description="patches trained with seeds seed, seed + 1, ...: mean and spread")
    checkpoint_every: int = Field(25, ge=1, description="checkpoint every K steps")
    resume: bool = Field(False, description="continue the run in the directory from its last checkpoint")
    tasks: Annotated[TaskSpec | None, SkipValidation] = Field(
        None, description="lm-evaluation-harness tasks for base, broken and patched (measure.tasks.prepare_tasks)")
    exclude: list[str] = Field(default_factory=list, description="columns held at 0: deleted, top:K or column "
                                                                 "numbers (stages/exclusion.py)")
    write_stats: bool = Field(True, description="read what the patch reads over the eval tokens for the patch "
                                                "geometry's write numbers (`run` leaves them to analyze, which "
                                                "measures them again)")

    @field_validator("exclude", mode="before")
    @classmethod
    def _excludes(cls, value):
        return parse_excludes([value] if isinstance(value, str) else value)

    @model_validator(mode="before")
    @classmethod
    def _recipe_config(cls, data):
        if isinstance(data, dict) and data.get("config") is None:
            name = data.get("recipe", "lbfgs")
            if name not in RECIPES:
                raise UsageError(f"unknown recipe '{name}': use {', '.join(RECIPES)}")
            data = {**data, "config": RECIPES[name]}
        return data

    @property
    def label(self) -> str:
        """The recipe that runs, as the record names it: "lbfgs", or "lbfgs+max_evals=100" when options changed it."""
        return recipe_label(self.recipe, self.config)


GEN_PROMPTS = generate.DEFAULT_PROMPTS[:5]
RANDOM_DRAWS = 3
# Baselines are scored on the first eval window (at least this many tokens), beside base and broken over the
# same tokens, with a 95% interval: their conclusions (a control near 0% or 100%) do not need the whole text.
BASELINE_TOKENS = 500
OTHER_ROW_SHARE = 4  # the other-row control trains with 1/4 of the patch's own steps (and of the recipe's budget)


def other_row_steps(cfg, trained_steps: int) -> int:
    """The other-row control's step cap: a quarter of the steps (L-BFGS: loss evaluations) the real patch took
    and of the recipe's budget, at least 2 (the start and one step). A row that can repair shows it by then: in a
    quarter of its evaluations the right row had removed 98% of its training loss on the embedded model (2 of 4)
    and 63% on Gemma-3-270M (3 of 15)."""
    return max(2, min(cfg.budget // OTHER_ROW_SHARE, trained_steps // OTHER_ROW_SHARE))


def _other_row(row: int, d_model: int, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed + 7)
    while True:
        r = int(torch.randint(d_model, (1,), generator=gen))
        if r != row:
            return r


def run_repair(
    loaded: Loaded,
    coords: list[WeightCoord],
    rows: list[tuple[int, int]],
    out: Path | None,
    job: RepairJob | None = None,
    progress: Progress | None = None,
    shared: Shared | None = None,
) -> tuple[RunRecord, PatchData]:
    """Train and evaluate a patch as `job` says (None: RepairJob's defaults): the run record and the trained patch
    (in memory). With a run directory `out` both are saved there (see the module docstring); None writes nothing.
    With `job.tasks` also the zero-shot task metrics of base, broken and patched (`record.tasks`). `progress`
    (superweight.progress.Progress) hears of each stage and training step. `shared` (stages/shared.Shared): the
    training sequences when the caller holds them (`run` hands its second repair the same, with the intact model's
    targets already computed; None or other sequences than this job's: made here), and the Passes that keep the
    eval passes of base, broken and patched for the caller's later measurements (and serve them).

    Everything is checked before the first file is written: the run directory (RunDir.check_start), the
    coordinates and rows, the context length, and the corpus (enough text for one training batch).
    `job.resume` continues the run in `out` from its last checkpoint (step 0 if none was made); on a finished run
    it returns the record and patch as they are and changes nothing. On its own (not inside `run`) the record gets its
    cost account (stages/account.py) under "repair"."""
    job = job or RepairJob()
    with own_account(loaded.model, "repair") as stages:
        return _repair(loaded, coords, rows, out, job, progress, shared or Shared(), stages)


def _repair(loaded, coords, rows, out, job: RepairJob, progress, shared: Shared, stages) -> tuple[RunRecord, PatchData]:
    cfg, corpus, max_length, baselines, seeds = job.config, job.corpus, job.max_length, job.baselines, job.seeds
    model, tok = loaded.model, loaded.tokenizer
    progress = or_silent(progress)
    stage = progress.stage
    bos = loaded.bos
    settings = repair_settings(loaded.spec, job, coords, rows, bos)
    run = RunDir(out) if out is not None else None
    if run is None and job.resume:
        raise UsageError("resume continues a run directory: give its out")
    if run is not None and run.check_start(settings, job.resume) == "finished" and job.resume:
        return run.record(), run.patch()
    ablation = Ablation(model, coords)  # validates coordinates first
    RowPatch(model, rows)  # validates rows
    originals = intact_values(model, coords)
    if all(w == w * c.scale for c, w in zip(coords, originals)):
        raise UsageError(f"ablating {', '.join(map(str, coords))} changes nothing (value "
                         f"{', '.join(f'{w:g}' for w in originals)}): there is no damage to repair")
    check_context(model, cfg.seq_len, option="--seq-len")
    data = training_data(tok, corpus, cfg, bos, reuse=shared.data)
    eval_ids = corpora.tokenize(tok, corpora.load_text(corpus, "eval"), job.eval_tokens)
    check_context(model, min(max_length, eval_ids.numel()), max_length)
    if job.exclude:  # a column past its row is refused here, before the first file is written
        resolve([s for s in job.exclude if not s.startswith("top:")], coords, rows, _d_ffs(model, rows))
    if run is not None:
        run.prepare(settings, job.resume)

    excluded = _excluded(model, coords, rows, (data, eval_ids, bos), job, progress) if job.exclude else None
    stage("Training patch" + (" (columns excluded)" if excluded else ""), cfg.budget)
    with part("train"):
        patch, state = train(model, coords, rows, data, cfg,
                             Track(out, job.checkpoint_every, job.resume, progress), exclude=excluded)
    saved = as_patch_data(model, patch, coords, {"model": model_id(loaded), "spec": loaded.spec, "recipe": job.label,
                                                "config": cfg, "excluded": excluded})
    if run is not None:
        write_patch(run.path, saved)
    # One Ablation serves every condition: measure() applies them one at a time.
    ab, rs = ablated_text(coords), ", ".join(map(row_text, rows))
    broken = BROKEN(ablation, weights=ab)
    held = f" (columns {'; '.join(','.join(map(str, c)) or '-' for c in excluded)} held at 0)" if excluded else ""
    # The patch as its file holds it, so that a later stage measuring that file (`run`'s analyses) reads this pass.
    fixed = PATCHED(patched(model, ablation, saved.rows, saved.vectors),
                    f"ablate {ab}, add trained patch on rows {rs}{held}")
    keep = {BROKEN.name(): edit_identity(coords), PATCHED.name(): edit_identity(coords, saved.rows, saved.vectors)}
    controls = []
    if baselines:
        with part("baselines"):
            controls = _baselines(model, ablation, rows, (originals, patch), data,
                                  configure(cfg, budget=other_row_steps(cfg, state.steps)), progress)
    extra_seeds, seeded = {}, []
    for seed in range(cfg.seed + 1, cfg.seed + seeds):
        stage(f"Training patch, seed {seed}", cfg.budget)
        with part(f"train seed {seed}"):
            other, _ = train(model, coords, rows, data, revalidated(cfg, seed=seed), Track(progress=progress),
                             exclude=excluded)
        extra_seeds[seed] = other
        seeded.append(SEED(Compose(ablation, other), seed=seed))
    conditions = [broken, fixed, *controls, *seeded]
    channels = sorted({(c.layer, c.row) for c in coords})
    stage("Evaluating", None)
    # The oracle puts the deleted values back through the patch rows: when those rows hold every ablated weight
    # it is the intact model, and its numbers are the base's over its tokens (no pass of its own).
    intact = {ORACLE.name()} if baselines and oracle_is_intact(coords, rows) else set()
    subset = {c.name: BASELINE_TOKENS for c in controls if c.name not in intact}
    per_token = TokenNLL(["base", BROKEN.name(), *subset])
    with part("eval"):
        metrics = measure(model, eval_ids, interventions(c for c in conditions if c.name not in intact), channels,
                          max_length, bos=bos,
                          scoring=Scoring(share_below=first_edited_layer(coords, rows), subsets=subset or None,
                                          observe=per_token if subset else None, passes=shared.passes,
                                          keep=keep))
    for name in intact:
        metrics[name], per_token.parts[name] = metrics[f"base@{BASELINE_TOKENS}"], per_token.parts["base"]
    stage("Generating", None)
    with part("generate"):
        gens = generate.compare(model, tok, interventions([broken, fixed]), GEN_PROMPTS)
    base = metrics["base"]
    inputs = None
    if job.write_stats:
        with part("patch inputs"):
            inputs = patch_inputs(model, coords, rows, eval_ids, max_length, bos=bos)
    rec = recovery_of(metrics, PATCHED.name())
    extra: dict = {}  # the optional parts, typed as the record is built (not set on it afterwards)
    if baselines:
        extra["baselines"] = {c.name: _baseline(metrics, c.name, per_token) for c in controls}
    if seeds > 1:
        patches = {cfg.seed: patch, **extra_seeds}
        extra["seeds"] = seed_spread(model, coords, rows, originals, metrics, patches, cfg.seed)
    if excluded:
        extra["exclusion"] = Exclusion(
            specs=job.exclude, columns={row_text(r): c for r, c in zip(rows, excluded)},
            ranked_by="the unconstrained repair's write per neuron" if ranking_needed(job.exclude) else None)
    if job.tasks is not None:
        extra["tasks"] = run_tasks(loaded, job.tasks, interventions([broken, fixed]), progress)
    record = RunRecord(
        protocol=protocol_of(loaded, corpus, "eval", base.n_tokens, max_length, max_length,
                             descriptions(conditions)),
        recipe=job.label, config=cfg, base=base, broken=metrics["broken"], patched=metrics["patched"],
        recovery=rec, training=state, verdict=verdict_of(rec),
        patch=geometry(model, coords, rows, patch.vectors, originals, inputs), generations=gens, **extra,
    )
    if stages is not None:
        record = revalidated(record, cost=stages.account(stages.eval_feed(loaded, record, job.eval_tokens)))
    if run is not None:
        run.write(record)
    return record, saved


def _baseline(metrics, name: str, per_token: TokenNLL) -> Baseline:
    """A baseline scored on its subset of the eval tokens: recovery against base and broken over those tokens."""
    n = BASELINE_TOKENS
    same = {"base": metrics[f"base@{n}"], BROKEN.name(): metrics[f"{BROKEN.name()}@{n}"], name: metrics[name]}
    interval = nll_gap_interval(per_token["base"], per_token[BROKEN.name()], per_token[name])
    return Baseline(**metrics[name].model_dump(), recovery=recovery_of(same, name),
                    interval=list(interval) if interval else None)


def repair_settings(spec: str, job: RepairJob, coords: list[WeightCoord], rows,
                    bos: corpora.Bos = corpora.Bos()) -> RunConfig:
    """What config.json records, and what a resumed run must match (api.repair checks it before the model loads)."""
    return RunConfig(
        model=spec, recipe=job.recipe, config=job.config, ablate=[str(c) for c in coords],
        rows=[list(r) for r in rows], corpus=job.corpus, eval_tokens=job.eval_tokens, max_length=job.max_length,
        baselines=job.baselines, checkpoint_every=job.checkpoint_every, seeds=job.seeds, bos=bos.mode,
        exclude=job.exclude,
    )


def _excluded(model, coords, rows, data, job: RepairJob, progress: Progress) -> list[list[int]]:
    """Per row, the columns `job.exclude` holds at 0; top:K first trains the unconstrained patch to rank the
    neurons by write over the eval tokens. `data`: (training Sequences, eval ids, bos)."""
    sequences, eval_ids, bos = data
    ranking = None
    if ranking_needed(job.exclude):
        progress.stage("Training the unconstrained patch (ranks the neurons for --exclude top:K)", job.config.budget)
        free, _ = train(model, coords, rows, sequences, job.config, Track(progress=progress))
        xs = patch_inputs(model, coords, rows, eval_ids, job.max_length, bos=bos)
        ranking = [top_writers(xs[site(r)], v) for r, v in zip(rows, free.vectors)]
    return resolve(job.exclude, coords, rows, _d_ffs(model, rows), ranking)


def _d_ffs(model, rows) -> list[int]:
    return [down_projection(model, layer, expert).d_ff for layer, _row, expert in map(split_row, rows)]


def oracle_is_intact(coords: list[WeightCoord], rows) -> bool:
    """Whether the oracle (the deleted values put back through the patch rows) is the intact model: every
    ablated weight lies in a patch row."""
    return all(any(row_of(c) == make_row(*split_row(r)) for r in rows) for c in coords)


def _baselines(model, ablation: Ablation, rows, trained, data, cfg, progress: Progress) -> list[Condition]:
    """Oracle, the paper's activation restore, random vectors writing as much as the patch, another row trained
    with `cfg` (its step cap: other_row_steps). `trained`: (the ablated weights' original values, the trained patch);
    `data`: the training Sequences."""
    originals, patch = trained
    seqs = data.ids
    coords = ablation.coords
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    oracle_vectors = []
    for r in rows:
        layer, _row, expert = split_row(r)
        v = torch.zeros(down_projection(model, layer, expert).d_ff)
        for c, w in zip(coords, originals):
            if row_of(c) == make_row(*split_row(r)):
                v[c.col] += w - w * c.scale
        oracle_vectors.append(v)
    # Several draws: with a large patch one draw's sign at the super column decides a lot (see notes). Each
    # draw writes as much into its row as the patch does (the same RMS of x · v over two training rows), a size
    # that no rescaling of the model changes, where the same ‖v‖ would depend on the parametrization.
    xs = {site(r): down_inputs(model, seqs[:2].flatten(), r[0], seqs.shape[1], expert=split_row(r)[2])[0]
          for r in rows}
    random_draws = []
    for _ in range(RANDOM_DRAWS):
        vectors = []
        for row, v in zip(rows, patch.vectors):
            x = xs[site(row)]
            r = torch.randn(v.numel(), generator=gen)
            write, drawn = rms(x @ v.detach().float().cpu()), rms(x @ r)
            vectors.append(r * (write / drawn) if drawn > 0 else r / r.norm() * v.detach().norm().cpu())
        random_draws.append(vectors)
    other = [make_row(layer, _other_row(row, down_projection(model, layer, expert).d_model, cfg.seed), expert)
             for layer, row, expert in map(split_row, rows)]
    progress.stage(f"Baseline: training rows {', '.join(map(row_text, other))}", cfg.budget)
    # A control: `cfg.budget` is other_row_steps' cap (a quarter of the loss evaluations the real patch took, still
    # stopping on progress) and no held-out check, which keeps the real patch from doing harm (docs/measurements.md).
    # It trains on the patch's own sequences (not the held-out ones), whose intact-model targets are kept.
    other_patch, spent = train(model, coords, other, data.trained_part(cfg.check_sequences),
                               configure(cfg, check_sequences=0), Track(progress=progress))
    return [
        ORACLE(patched(model, ablation, rows, oracle_vectors), None if not oracle_is_intact(coords, rows) else
               ORACLE.describe() + " (here every ablated weight lies in a patch row: the intact model, read from the "
                                   "base pass)"),
        ACTIVATION_RESTORE(Compose(ablation, ActivationRestore(model, coords, originals))),
        *(RANDOM_WRITE(patched(model, ablation, rows, vectors), i=i + 1) for i, vectors in enumerate(random_draws)),
        OTHER_ROW(Compose(ablation, other_patch), rows=", ".join(map(row_text, other)), steps=spent.steps),
    ]


def seed_spread(model, coords, rows, originals, metrics, patches: dict[int, RowPatch], first: int) -> Seeds:
    """Recovery, norm and cosine of each seed's patch, and their mean and (sample) standard deviation."""
    values = []
    for seed, patch in patches.items():
        name = PATCHED.name() if seed == first else SEED.name(seed=seed)
        g = geometry(model, coords, rows, patch.vectors, originals)
        rec = recovery_of(metrics, name)
        values.append(SeedScores(seed=seed, nll_gap=rec.nll_gap, kl=rec.kl, norm=g.norm,
                                 cos_original_row=g.cos_original_row))
    keys = [k for k in SeedScores.model_fields if k != "seed"]
    nan = float("nan")  # an undefined recovery (no damage) stays undefined in the mean and spread: null
    table = torch.tensor([[nan if getattr(v, k) is None else getattr(v, k) for k in keys] for v in values],
                         dtype=torch.float64)

    def row(t: torch.Tensor) -> SeedScores:
        return SeedScores(**{k: None if x != x else x for k, x in zip(keys, t.tolist())})

    return Seeds(values=values, mean=row(table.mean(0)), std=row(table.std(0)))
