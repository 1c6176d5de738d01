"""Train sparse patches: how few entries of the row patch can repair the model?

Post-hoc top-k (analyze, measure/sparsity.py) cuts a dense patch; here the sparsity is part of training, over a sweep of
strengths, and each trained patch is scored by its non-zero count and its recovery. Two objectives:

- `l1`: proximal soft-thresholding after every optimiser step, u <- sign(u) * max(|u| - strength * lr, 0), on
  the run's training coordinates u, not on d: d itself for the weight-space recipes (`quick`, `sgd`, `fast`,
  `seed`), d_j = u_j / n_j for `balanced`, d_j = u_j ‖W[:, j]‖ (column coordinates) for the default `lbfgs`.
  With Adam each entry moves about lr per step, so `strength` is the fraction of a step shrunk away: an
  entry survives only where the KL gradient keeps pushing it one way. Exact zeros, no extra parameters.
- `l0`: a hard-concrete gate per entry (Louizos et al. 2018, "Learning Sparse Neural Networks through L0
  Regularization", as used in circuit pruning): the patch is d * z, z in [0, 1] sampled by a stretched,
  clamped concrete distribution with learned log_alpha; the penalty is `strength` x the expected fraction of
  open gates. At evaluation z is deterministic and exactly 0 for closed gates.

Both start from the run's dense patch (a warm start, as pruning does) and train `steps` more steps; columns the
run's repair held at 0 (`repair --exclude`, patch_config.json's `excluded`) stay 0.

    record = run_sparsify(loaded, Path("runs/x"))    # record.sparse_training.frontier
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from superweight.core.conditions import BROKEN, SPARSE, ablated_text, interventions
from superweight.core.intervene import Ablation, intact_values
from superweight.core.patching import check_fits, patched
from superweight.core.prefix import first_edited_layer
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.io.patchfile import load_patch
from superweight.schema.record import RunRecord, SparseTraining
from superweight.io.rundir import RunDir
from superweight.measure.geometry import geometry
from superweight.measure.metrics import Scoring, measure, protocol_of
from superweight.measure.recovery import scored
from superweight.engine.config import configure
from superweight.engine.patch import SpacePatch
from superweight.progress import Progress, or_silent
from superweight.settings import Settings, revalidated
from superweight.engine.train import Track, train, training_data

SPARSE_ADAM_LR = 0.3  # the `quick` recipe's Adam lr, whose patches the default strengths were tuned on
DEFAULT_STRENGTHS = {"l1": (0.6, 0.8, 1.0), "l0": (1.0, 10.0, 30.0)}
# Per sparse patch, what it is: is the sparsest repair the deleted weight itself?
GEOMETRY_KEYS = ("norm", "cos_original_row", "col", "value_at_col", "deleted_value", "cos_ablated_direction")
# Hard-concrete constants from Louizos et al.: temperature beta, stretch interval (gamma, zeta).
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


class L1Prox:
    method = "l1"

    def __init__(self, strength: float, init: list[torch.Tensor] | None = None):
        self.strength, self.init = strength, init  # init: the vectors training starts from (None: zeros)

    def patch(self, model, rows, init, units=None) -> SpacePatch:
        return SpacePatch(model, rows, units, init)

    def penalty(self, patch) -> float:
        return 0.0  # the proximal step does the work

    @torch.no_grad()
    def after_step(self, patch: SpacePatch, lr: float) -> None:
        # On the trained coordinates u (d = P u, entry by entry for diagonal P): in the balanced space the
        # threshold means the same at every parametrization of the model.
        for v in patch.vectors:
            v.copy_(v.sign() * (v.abs() - self.strength * lr).clamp_min(0))

    def final(self, patch: SpacePatch) -> list[torch.Tensor]:
        return patch.weights()


class GatedRowPatch(SpacePatch):
    """A row patch d * z with one hard-concrete gate z per entry (`training` samples z, else deterministic).

    log_alpha = LOG_ALPHA_SCALE * p with p the trained parameter: Adam moves p ~lr a step, and a gate must
    travel from open (log_alpha 3) past closed (-2.4) within the few steps a sparse run gets."""

    LOG_ALPHA_SCALE = 5.0

    def __init__(self, model, rows, vectors, units=None, log_alpha: float = 3.0):
        super().__init__(model, rows, units, vectors)
        self.p = [nn.Parameter(torch.full_like(v, log_alpha / self.LOG_ALPHA_SCALE)) for v in self.vectors]
        self.training = True

    @property
    def log_alpha(self) -> list[torch.Tensor]:
        return [p * self.LOG_ALPHA_SCALE for p in self.p]

    def parameters(self) -> list[nn.Parameter]:
        return [*self.vectors, *self.p]

    def gate(self, i: int) -> torch.Tensor:
        la = self.log_alpha[i]
        if self.training:
            u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + la) / BETA)
        else:
            s = torch.sigmoid(la)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def vector(self, i: int) -> torch.Tensor:
        return super().vector(i) * self.gate(i)

    def expected_open(self) -> torch.Tensor:
        """Expected fraction of non-zero gates (the L0 norm / n)."""
        la = torch.cat(self.log_alpha)
        return torch.sigmoid(la - BETA * math.log(-GAMMA / ZETA)).mean()


class HardConcrete:
    method = "l0"

    def __init__(self, strength: float, init: list[torch.Tensor] | None = None):
        self.strength, self.init = strength, init  # init: the vectors training starts from (None: zeros)

    def patch(self, model, rows, init, units=None) -> GatedRowPatch:
        return GatedRowPatch(model, rows, init, units)

    def penalty(self, patch: GatedRowPatch) -> torch.Tensor:
        return self.strength * patch.expected_open()

    def after_step(self, patch, lr: float) -> None:
        pass

    @torch.no_grad()
    def final(self, patch: GatedRowPatch) -> list[torch.Tensor]:
        patch.training = False
        return [patch.vector(i).detach().clone() for i in range(len(patch.vectors))]


OBJECTIVES = {"l1": L1Prox, "l0": HardConcrete}


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both fewer non-zeros and more recovery, by nnz (none where recovery is
    undefined: an ablation without damage)."""
    def gap(p: dict) -> float:
        return -math.inf if p["nll_gap"] is None else p["nll_gap"]

    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p["nnz"], -gap(p))):
        if gap(p) > best:
            front.append(p)
            best = gap(p)
    return front


class SparsifyConfig(Settings):
    """What `superweight sparsify` trains and scores (its defaults), checked when made."""

    strengths: dict[Literal["l1", "l0"], tuple[float, ...]] = Field(
        DEFAULT_STRENGTHS, min_length=1, description="method -> penalty strengths, one sparse patch each")
    steps: int | None = Field(None, ge=1, description="steps per sparse patch (None: half the run's)")
    tokens: int = Field(2048, ge=2, description="eval-split tokens to score each patch on")
    max_length: int = Field(512, ge=2, description="window length in tokens")


def run_sparsify(loaded: Loaded, run_dir: Path, cfg: SparsifyConfig | None = None,
                 progress: Progress | None = None, record: RunRecord | None = None) -> RunRecord:
    """Train one sparse patch per (method, strength) from the run's patch; score, find the frontier, save.
    `progress` (superweight.progress.Progress) hears of each training and its steps; `record`: the run's record
    when the caller holds it (the pipeline), else it is read from `run_dir`."""
    cfg_sparse = cfg or SparsifyConfig()
    strengths, steps, n_tokens, max_length = (cfg_sparse.strengths, cfg_sparse.steps, cfg_sparse.tokens,
                                              cfg_sparse.max_length)
    progress = or_silent(progress)
    run_dir = Path(run_dir)
    record = record if record is not None else RunDir(run_dir).record()
    patch = load_patch(run_dir)
    model, tok = loaded.model, loaded.tokenizer
    check_fits(model, patch)
    cfg = record.config
    if cfg.optimizer == "lbfgs":  # 16 loss evaluations of 4 sequences: as many sequence passes as 32 steps of batch 2
        # (its cap, 64, stops early on progress: the sparse budget stays the one the strengths were tuned for)
        cfg = configure(cfg, optimizer="sgd", batch_size=2, budget=min(cfg.max_evals, 16) * 2)
    steps = steps or max(cfg.steps // 2, 1)
    cfg = revalidated(cfg, steps=steps, schedule="constant")
    if cfg.optimizer not in ("adam", "adamw"):
        # The strengths are fractions of an Adam step and the gates need Adam's steps to close; in the run's
        # coordinates (cfg.space: column for the default recipe, where a threshold on u means the same under
        # neuron, residual-stream and norm-gain rescaling) Adam is as scale-free as the run was.
        cfg = revalidated(cfg, optimizer="adam", lr=SPARSE_ADAM_LR)
    corpus = record.protocol.corpus
    bos = loaded.bos
    data = training_data(tok, corpus, cfg, bos)  # every strength trains on it: one teacher pass per sequence
    track = Track(progress=progress)
    originals = intact_values(model, patch.ablated)
    trained = []
    for method, values in strengths.items():
        for strength in values:
            progress.stage(f"Sparse training: {method}, strength {strength:g}", steps)
            objective = OBJECTIVES[method](strength, patch.vectors)
            t0 = time.perf_counter()
            p, _ = train(model, patch.ablated, patch.rows, data, cfg, track, objective, patch.config.excluded)
            vectors = objective.final(p)
            g = geometry(model, patch.ablated, patch.rows, vectors, originals)
            trained.append({"method": method, "strength": strength, "vectors": vectors,
                            "nnz": int(sum((v != 0).sum() for v in vectors)), "seconds": time.perf_counter() - t0,
                            "geometry": {k: getattr(g, k) for k in GEOMETRY_KEYS} | {"top_entries": g.top_entries[:8]}})
    progress.stage("Scoring sparse patches", None)
    ablation = Ablation(model, patch.ablated)
    conditions = [BROKEN(ablation, weights=ablated_text(patch.ablated)),
                  *(SPARSE(patched(model, ablation, patch.rows, t["vectors"]), i=i) for i, t in enumerate(trained))]
    ids = corpora.tokenize(tok, corpora.load_text(corpus, "eval"), n_tokens)
    metrics = measure(model, ids, interventions(conditions), max_length=max_length, bos=bos,
                      scoring=Scoring(share_below=first_edited_layer(patch.ablated, patch.rows)))
    base, broken = metrics["base"], metrics["broken"]
    points = []
    for i, t in enumerate(trained):
        scores = scored(metrics[SPARSE.name(i=i)], base, broken)
        points.append({"method": t["method"], "strength": t["strength"], "nnz": t["nnz"], **scores.model_dump(),
                       "seconds": t["seconds"], **t["geometry"]})
    frontier = pareto(points)
    sparse = SparseTraining.model_validate({
        "protocol": protocol_of(loaded, corpus, "eval", base.n_tokens, max_length, max_length,
                                {SPARSE.key: SPARSE.describe()}),
        "steps": steps, "lr": cfg.lr,
        "points": points,
        "frontier": frontier,
        "smallest_90": next((p for p in frontier if (p["nll_gap"] or 0) >= 0.9), None),
    })
    record = revalidated(record, sparse_training=sparse)
    RunDir(run_dir).write(record)
    return record
