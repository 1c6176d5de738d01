"""Restoration or compensation: what can the network do without the deleted weight, and through which neurons?

A row patch can repair in two ways: write the deleted weight back (restoration: d[col] near the deleted value), or
route the same write through other neurons (compensation). The compensation frontier repairs again and again
with more of the writing neurons held at 0 (stages/exclusion.py's mask), each a full repair with the run's
recipe, and scores each point:

    record = run_compensate(loaded, Path("runs/x"))      # record.compensation.points: top 0, 1, 2, 4, ... excluded
    regime = without_deleted(loaded, Path("runs/x"), record, tokens=2048)   # `run`: the deleted columns at 0

The ranking is greedy: point 2k excludes the k neurons of point k and the top k writers (RMS over the eval tokens
of x_j d_j, as the neuron view ranks them) of point k's patch. A fixed ranking from the unconstrained patch would
say little past its first entry: a restoring patch writes through the deleted neuron and hardly any other, so its
second to sixty-fourth writers are noise, not the paths the network falls back on. Greedy exclusion knocks out
one compensation path after another, the ones each repair actually found. The frontier stops once the held-out
KL recovery of a point falls below `stop_below` (10%) or at `max_k` neurons (the budget); each point is then
scored on the eval tokens in one shared pass. Exclusions apply to the first patch row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from superweight.core.conditions import BROKEN, EXCLUDED, WITHOUT_DELETED
from superweight.core.coords import row_text, site, split_row
from superweight.core.intervene import Ablation, intact_values
from superweight.core.patching import check_fits, patched
from superweight.core.prefix import first_edited_layer
from superweight.io import corpora
from superweight.schema.compensation import Compensation, CompensationPoint, RegimeResult, WriteContext, Writer
from superweight.io.models import Loaded
from superweight.io.patchfile import load_patch
from superweight.schema.record import RunRecord
from superweight.io.rundir import RunDir
from superweight.measure.geometry import geometry, neuron_writes, regime_of
from superweight.measure.inputs import down_inputs, seen_ids
from superweight.measure.metrics import Passes, Scoring, measure, n_scored
from superweight.stages.shared import Shared
from superweight.measure.recovery import scored
from superweight.measure.views import neuron_contexts
from superweight.progress import Progress, or_silent
from superweight.settings import Settings, revalidated
from superweight.stages.exclusion import deleted_columns, top_writers
from superweight.engine.config import configure
from superweight.engine.objective import Sequences
from superweight.engine.train import Track, train, training_data

DELETED_STAGE = "Repair (deleted excluded)"  # `run`'s second repair: a stage and timing of its own


class CompensateConfig(Settings):
    """What `superweight compensate` does (its defaults), checked when made."""

    tokens: int = Field(1024, ge=2, description="eval-split tokens each point is scored on")
    max_length: int = Field(512, ge=2, description="window length in tokens")
    max_k: int = Field(64, ge=1, description="the budget: exclude at most this many neurons (1, 2, 4, ... up to it)")
    stop_below: float = Field(0.1, ge=0, lt=1, description="stop once a point's held-out KL recovery is below this")
    steps: int | None = Field(None, ge=1, description="cap on each point's budget (steps; lbfgs: loss evaluations); "
                                                      "None: the run's recipe as it ran")
    neurons: int = Field(5, ge=1, description="writing neurons listed per point, with their top contexts")
    contexts: int = Field(3, ge=1, description="contexts per listed neuron")


def participation(write: torch.Tensor) -> float | None:
    """How many neurons carry the write: (Σ_j w_j²)² / Σ_j w_j⁴ for the per-neuron write RMS w (1: one neuron,
    n: n neurons writing equally); None when nothing is written."""
    p = write.double().pow(2)
    return (p.sum() ** 2 / p.pow(2).sum()).item() if p.sum() > 0 else None


def check_recovery(training) -> float | None:
    """1 - best KL / broken KL of a repair's held-out check (None without one)."""
    c = training.check if training is not None else None
    return None if c is None or not c.broken_kl else 1 - c.best_kl / c.broken_kl


@dataclass
class _Run:
    """A run directory's repair, ready to repair again: the model, the patch, the data, what the patch reads."""

    loaded: Loaded
    record: RunRecord
    patch: object  # core.patching.PatchData
    data: Sequences  # the training sequences, shared by every repair of this run (the teacher runs once)
    ids: torch.Tensor  # eval ids
    x: torch.Tensor  # the first row's down-projection input over `ids` (ablated model), [positions, d_ff]
    positions: list[int]
    originals: list[float]
    passes: Passes | None = None  # the base pass over the eval windows, when the caller kept it

    @classmethod
    def open(cls, loaded: Loaded, run_dir: Path, record: RunRecord | None, tokens: int, max_length: int,
             shared: Shared | None = None) -> "_Run":
        """`shared` (stages/shared.Shared): the run's training Sequences and its kept passes, when the caller holds
        them."""
        shared = shared or Shared()
        record = record if record is not None else RunDir(run_dir).record()
        patch = load_patch(run_dir)
        check_fits(loaded.model, patch)
        corpus, bos = record.protocol.corpus, loaded.bos
        data = training_data(loaded.tokenizer, corpus, record.config, bos, reuse=shared.data)
        ids = corpora.tokenize(loaded.tokenizer, corpora.load_text(corpus, "eval"), tokens)
        layer, _row, expert = split_row(patch.rows[0])
        with Ablation(loaded.model, patch.ablated):  # what the patch reads: the ablated model's inputs
            x, positions = down_inputs(loaded.model, ids, layer, max_length, bos, expert)
        return cls(loaded, record, patch, data, ids, x, positions, intact_values(loaded.model, patch.ablated),
                   shared.passes)

    def repair(self, exclude: list[list[int]], progress: Progress, steps: int | None = None):
        cfg = self.record.config if steps is None else configure(self.record.config, budget=steps)
        return train(self.loaded.model, self.patch.ablated, self.patch.rows, self.data, cfg,
                     Track(progress=progress), exclude=exclude)

    def score(self, trained: dict[str, list], max_length: int) -> dict:
        """name -> vectors, measured beside base and broken on the eval ids in one pass. The broken model is read
        from the run's record instead when that measured it on the same tokens (`run`'s second repair)."""
        model, coords = self.loaded.model, self.patch.ablated
        ablation = Ablation(model, coords)
        pr, broken = self.record.protocol, self.record.broken
        known = pr.max_length == max_length and broken.n_tokens == n_scored(self.ids.numel(), max_length,
                                                                            bos=self.loaded.bos)
        conditions = ({} if known else {BROKEN.name(): ablation}) | {
            n: patched(model, ablation, self.patch.rows, v) for n, v in trained.items()}
        out = measure(model, self.ids, conditions, max_length=max_length, bos=self.loaded.bos,
                      scoring=Scoring(share_below=first_edited_layer(coords, self.patch.rows), passes=self.passes))
        return out | ({BROKEN.name(): broken} if known else {})

    def point(self, label: str, k: int, excluded: list[int], vectors, training, metrics, cfg) -> CompensationPoint:
        """One frontier point from its patch, its training and measure()'s results (`metrics[name]` under
        `label`'s condition name is metrics["point"])."""
        model, p = self.loaded.model, self.patch
        sc = scored(metrics["point"], metrics["base"], metrics[BROKEN.name()])
        g = geometry(model, p.ablated, p.rows, vectors, self.originals, {site(p.rows[0]): self.x})
        d = vectors[0].detach().float().cpu()
        w = neuron_writes(self.x.float(), d)
        total = w.pow(2).sum().item()
        top = [j for j in w.argsort(descending=True).tolist()[: cfg.neurons] if w[j] > 0]
        seen = seen_ids(self.ids, cfg.max_length, self.loaded.bos)
        found = neuron_contexts(self.loaded.tokenizer, seen, self.x, self.positions, d, top, cfg.contexts)
        neurons = [Writer(neuron=n.neuron, write_rms=w[n.neuron].item(), share=w[n.neuron].item() ** 2 / total,
                          value=n.value, contexts=[WriteContext(**c.model_dump()) for c in n.contexts])
                   for n in found]
        return CompensationPoint(
            label=label, k=k, excluded=excluded, nll=sc.nll, ppl=sc.ppl, kl=sc.kl, nll_gap=sc.nll_gap,
            kl_recovery=sc.kl_recovery, check=training.check if training else None,
            check_recovery=check_recovery(training), norm=g.norm, cos_original_row=g.cos_original_row,
            value_ratio=g.value_ratio, write_vs_removed=g.write_vs_removed, participation=participation(w),
            neurons=neurons, evals=training.steps if training else 0, seconds=training.seconds if training else 0.0,
            final_loss=training.final_loss if training else None)


def run_compensate(loaded: Loaded, run_dir: Path, cfg: CompensateConfig | None = None,
                   progress: Progress | None = None, record: RunRecord | None = None) -> RunRecord:
    """The compensation frontier of the run in `run_dir` (see the module docstring); writes and returns the
    record with `compensation`. Point 0 is the run's own patch (its own exclusions, if any, stay in every point)."""
    cfg = cfg or CompensateConfig()
    progress = or_silent(progress)
    t0 = time.perf_counter()
    run = _Run.open(loaded, Path(run_dir), record, cfg.tokens, cfg.max_length)
    p = run.patch
    own = list((p.config.excluded or [[]])[0])
    rest = [list(c) for c in (p.config.excluded or [[]] * len(p.rows))[1:]] or [[] for _ in p.rows[1:]]
    points = [("none", 0, own, p.vectors, run.record.training)]
    added: list[int] = []
    stopped = f"budget: {cfg.max_k} neurons excluded"
    k, prev = 1, p.vectors[0]
    while k <= cfg.max_k:
        new = top_writers(run.x, prev, skip=own + added)[: k - len(added)]
        if not new:
            stopped = "no neuron left that writes"
            break
        added += new
        excluded = sorted(own + added)
        progress.stage(f"Compensation frontier: top {k} writers excluded", cfg.steps or run.record.config.budget)
        patch, training = run.repair([excluded, *rest], progress, cfg.steps)
        points.append((f"top {k}", k, excluded, patch.vectors, training))
        rec = check_recovery(training)
        if rec is not None and rec < cfg.stop_below:
            stopped = f"held-out KL recovery {rec:.1%} < {cfg.stop_below:.0%} at {k} neurons excluded"
            break
        k, prev = k * 2, patch.vectors[0]
    progress.stage(f"Scoring {len(points)} frontier points", None)
    metrics = run.score({EXCLUDED.name(k=pt[1]): pt[3] for pt in points}, cfg.max_length)
    frontier = [run.point(label, kk, ex, vec, tr, metrics | {"point": metrics[EXCLUDED.name(k=kk)]}, cfg)
                for label, kk, ex, vec, tr in points]
    recipe = run.record.recipe + (f" (steps capped at {cfg.steps})" if cfg.steps else "")
    comp = Compensation(ranking="greedy", recipe=recipe, row=row_text(p.rows[0]),
                        tokens=metrics["base"].n_tokens, stop_below=cfg.stop_below, max_k=cfg.max_k,
                        stopped=stopped, points=frontier, seconds=time.perf_counter() - t0)
    record = revalidated(run.record, compensation=comp)
    RunDir(Path(run_dir)).write(record)
    return record


def without_deleted(loaded: Loaded, run_dir: Path, record: RunRecord, tokens: int,
                    progress: Progress | None = None, shared: Shared | None = None) -> RegimeResult:
    """`run`'s second point: the run's repair again with the deleted weights' columns held at 0, scored on the
    first `tokens` eval tokens (the repair's own), beside the regime of the run's patch. `shared`
    (stages/shared.Shared): the repair's training Sequences and Passes, whose teacher targets and base pass are then
    reused."""
    progress = or_silent(progress)
    cfg = CompensateConfig(tokens=tokens, max_length=record.protocol.max_length)
    run = _Run.open(loaded, Path(run_dir), record, tokens, cfg.max_length, shared)
    p = run.patch
    columns = [deleted_columns(p.ablated, r) for r in p.rows]
    ratio = record.patch.value_ratio
    if not columns[0]:  # the patch row is not the ablated one: nothing to exclude
        return RegimeResult(regime=regime_of(ratio), value_ratio=ratio)
    progress.stage(DELETED_STAGE, record.config.budget)
    patch, training = run.repair(columns, progress)
    progress.stage(f"{DELETED_STAGE}: scoring", None)
    metrics = run.score({WITHOUT_DELETED.name(): patch.vectors}, cfg.max_length)
    point = run.point("deleted", len(columns[0]), columns[0], patch.vectors, training,
                      metrics | {"point": metrics[WITHOUT_DELETED.name()]}, cfg)
    return RegimeResult(regime=regime_of(ratio), value_ratio=ratio, without_deleted=point)

