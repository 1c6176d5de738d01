"""The analyze stage: what the repair patch is, what it needs, and what it changes, measured on a run directory.

    record = run_analyze(loaded, Path("runs/x"))      # adds patch, sparsity, tokens, neurons, sweep, sinks, ...
    record.sparsity[0]                                # SparsityPoint(k=1, nll_gap=..., random=...)

This module builds the conditions and writes the record's analysis part; the measurements are measure/'s
(sparsity.py: the patch cut to k entries; views.py: tokens, neurons, where the patch writes, the scale sweep;
geometry.py; sinks.py). The measurements share base passes (`metrics.measure`, blocks below the patched layer
run once per batch): the broken and patched models, the scaled weight (its scale 0 is the broken model) and the
first round of the sparsity search (k = 1); the search's further rounds (bisection over k, then random-k at the
answers: measure/sparsity.SparsitySearch) each add a base pass and a few conditions. The mechanism view (`sinks`, measure/sinks.py) runs base, broken and patched again, with
eager attention, on windows of at most 256 tokens. The keys it adds to the run record are documented in
docs/results.md.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from superweight.core.conditions import (
    BROKEN, CONTRIB_K, PATCHED, RANDOM_K, SCALE, TOP_K, ablated_text, descriptions, interventions,
)
from superweight.core.cost import part
from superweight.core.coords import make_row, row_of, site, split_row
from superweight.core.intervene import Ablation, intact_values
from superweight.core.patching import check_fits, edit_identity, patched
from superweight.core.prefix import first_edited_layer
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.io.patchfile import load_patch
from superweight.schema.record import Analysis, RunRecord
from superweight.io.rundir import RunDir
from superweight.measure.geometry import geometry, neuron_writes
from superweight.measure.inputs import seen_ids
from superweight.measure.metrics import Passes, Scoring, measure, n_scored, protocol_of
from superweight.measure.sinks import WINDOW, sink_view
from superweight.measure.sparsity import SparsitySearch, contribution_scores
from superweight.measure.views import TokenStats, logit_lens, neuron_contexts, patch_output, sweep_points
from superweight.progress import Progress, or_silent
from superweight.settings import Settings, revalidated
from superweight.stages.account import eval_tokens_of, own_account

SWEEP_SCALES = (0.5, 0.0, -1.0, 2.0)
# The scale sweep and the random-k controls are scored on the first eval window (at least this many tokens) and the
# sink view reads this many tokens (two 256-token windows): their conclusions do not move with more
# (docs/measurements.md).
SWEEP_TOKENS = 500
SINK_TOKENS = 512


class AnalyzeConfig(Settings):
    """What `superweight analyze` measures (its defaults), checked when made."""

    tokens: int = Field(2048, ge=2, description="eval-split tokens to analyse on")
    draws: int = Field(3, ge=1, description="random-k control draws per k")
    max_length: int = Field(512, ge=2, description="window length in tokens")
    top_neurons: int = Field(5, ge=1, description="neurons shown in the neuron view")


def run_analyze(loaded: Loaded, run_dir: Path, cfg: AnalyzeConfig | None = None, progress: Progress | None = None,
                record: RunRecord | None = None, passes: Passes | None = None) -> RunRecord:
    """Analyse the patch of `run_dir` on cfg.tokens eval tokens; writes and returns the updated record. `record`:
    the run's record when the caller holds it (the pipeline), else it is read from `run_dir`; `progress`
    (superweight.progress.Progress) hears of each view and of the scored tokens. On its own (not inside `run`) it
    adds its model work to the record's cost account (stages/account.py) under "analyze". `passes`
    (measure/metrics.Passes): the base pass the caller kept over the same eval windows (`run`: the repair's)."""
    cfg = cfg or AnalyzeConfig()
    with own_account(loaded.model, "analyze") as stages:
        return _analyze(loaded, Path(run_dir), cfg, progress, record, passes, stages)


def _analyze(loaded: Loaded, run_dir: Path, cfg: AnalyzeConfig, progress, record, passes, stages) -> RunRecord:
    n_tokens, draws, max_length, top_neurons = cfg.tokens, cfg.draws, cfg.max_length, cfg.top_neurons
    progress = or_silent(progress)
    stage = progress.stage
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    record = record if record is not None else RunDir(run_dir).record()
    patch = load_patch(run_dir)
    model, tok = loaded.model, loaded.tokenizer
    check_fits(model, patch)
    corpus = record.protocol.corpus
    bos = loaded.bos
    ids = corpora.tokenize(tok, corpora.load_text(corpus, "eval"), n_tokens)
    coords = patch.ablated
    originals = intact_values(model, coords)
    ablation = Ablation(model, coords)
    broken = BROKEN(ablation, weights=ablated_text(coords))
    fixed = PATCHED(patched(model, ablation, patch.rows, patch.vectors))
    stage("Reading the patch's inputs", None)
    with part("patch inputs"):
        by_contribution, inputs = contribution_scores(model, ids, patch, max_length, bos)
    first = coords[0]
    # The scale sweep and the random-k controls on the first window when that is fewer tokens than the rest (a
    # short analysis scores them whole): their conclusions (a curve's shape, a control near 0%) need no more.
    sweep_tokens = SWEEP_TOKENS if n_scored(ids.numel(), max_length, bos=bos) > SWEEP_TOKENS else None
    search = SparsitySearch(model, ablation, patch, draws, by_contribution, random_tokens=sweep_tokens)
    # Scaling the only ablated weight by 0 is the broken model: that point of the sweep is read from it.
    same = {0.0: BROKEN.name()} if len(coords) == 1 and first.scale == 0.0 else {}
    conditions = [broken, fixed, *search.start(),
                  *(SCALE(Ablation(model, [revalidated(first, scale=s)]), s=s, weight=first)
                    for s in SWEEP_SCALES if s not in same)]
    channels = sorted({(c.layer, c.row) for c in coords})
    share_below = first_edited_layer(coords, patch.rows)
    stats = TokenStats(model.get_output_embeddings().weight.shape[0])
    subsets = {c.name: sweep_tokens for c in conditions if c.name in SCALE} if sweep_tokens else {}
    subsets |= search.subsets(conditions)
    stage(f"Analysing: {len(conditions)} conditions", n_scored(ids.numel(), max_length, bos=bos))
    with part("conditions"):
        metrics = measure(model, ids, interventions(conditions), channels, max_length, bos=bos,
                          scoring=Scoring(share_below=share_below, progress=progress.advance, observe=stats,
                                          subsets=subsets or None, passes=passes, keep={
                                              broken.name: edit_identity(coords),
                                              fixed.name: edit_identity(coords, patch.rows, patch.vectors)}))
    metrics |= {SCALE.name(s=s): metrics[f"{name}@{sweep_tokens}" if sweep_tokens else name]
                for s, name in same.items()}
    while more := search.next(metrics):  # the sparsity search's further rounds (measure/sparsity.py)
        stage(f"Sparsity search: {len(more)} conditions", None)
        with part("sparsity search"):
            found = measure(model, ids, interventions(more), channels, max_length, bos=bos,
                            scoring=Scoring(share_below=share_below, subsets=search.subsets(more) or None,
                                            passes=passes))
        metrics |= {k: v for k, v in found.items() if k != "base"}
    base = metrics["base"]
    stage("Mechanism view: attention sinks", None)
    with part("sinks"):
        sinks = sink_view(model, ids, interventions([broken, fixed]), (first.layer, first.row), bos,
                          window=min(WINDOW, max_length), max_tokens=SINK_TOKENS, share_below=share_below)
    stage("Token and neuron views", None)
    (layer, row, _expert), vector = split_row(patch.rows[0]), patch.vectors[0].float()
    x, positions = inputs[site(patch.rows[0])]
    seen = seen_ids(ids, max_length, bos)  # the token of each row of x
    # The neurons that write most (RMS of x_j d_j over tokens): the same neurons however the MLP is scaled.
    neurons = neuron_writes(x, vector).topk(min(top_neurons, vector.numel())).indices.tolist()
    col, deleted = next(((c.col, w - w * c.scale) for c, w in zip(coords, originals)
                         if row_of(c) == make_row(*split_row(patch.rows[0]))), (None, None))
    described = descriptions([broken, fixed]) | {
        f.key: f.describe(draws=draws, weight=first) for f in (TOP_K, CONTRIB_K, RANDOM_K, SCALE)}
    protocol = protocol_of(loaded, corpus, "eval", base.n_tokens, max_length, max_length, described)
    parts = {
        "patch": geometry(model, coords, patch.rows, patch.vectors, originals,
                          {key: xs for key, (xs, _) in inputs.items()}),
        "super_activation": {k: metrics[k].super_activation for k in ("base", BROKEN.name(), PATCHED.name())},
        "sparsity": search.table(metrics),
        "tokens": stats.summary(tok, logit_lens(model, tok, layer, row)),
        "neurons": neuron_contexts(tok, seen, x, positions, vector, neurons),
        "patch_output": patch_output(tok, seen, x, positions, vector, col, deleted),
        "sweep": sweep_points(metrics, SWEEP_SCALES, sweep_tokens),
        "sinks": sinks,
        "analysis": Analysis(protocol=protocol, draws=draws, seconds=time.perf_counter() - t0,
                             subset_tokens=metrics[f"base@{sweep_tokens}"].n_tokens if sweep_tokens else None),
    }
    record = RunRecord.model_validate(dict(record) | parts)
    if stages is not None:
        fed = record.cost.eval_tokens if record.cost else stages.eval_feed(
            loaded, record, eval_tokens_of(run_dir, record.protocol.n_tokens))
        record = revalidated(record, cost=stages.account(fed, before=record.cost))
    RunDir(run_dir).write(record)
    return record
