"""The run record: everything a run directory's results.json holds, as pydantic models, versioned.

    record = RunRecord.model_validate(migrate(json.loads(text)))   # what io/rundir.RunDir.record does
    record.patched.ppl, record.patch.rows[1].norm, record.sparsity[0].by_contribution.nll_gap

Each stage fills its part and leaves the rest as it found it: `repair` the conditions, recovery, training and
patch geometry; `analyze` the analyses; `sparsify` sparse_training; `run` detect and timings (the keys and
what they mean: docs/results.md). Metrics and Protocol are defined here, beside the record that stores them,
and measure/metrics.py produces them.

Version 1 is the untyped results.json written before the record had a schema (no `schema_version` key);
version 2 kept `config` as an untyped dict and `recipe` as the name given even when options changed it;
version 3 types `config` (one flat RepairConfig) and names the recipe that ran ("lbfgs+steps=100");
version 4 makes `config` the engine's union (engine/config.py: LbfgsConfig with `max_evals`, FirstOrderConfig with
`steps`, schedule and warm-up; `check_sequences` for `check_rows`), and names the recipe "lbfgs+max_evals=100";
version 5 adds lbfgs's `done_tol` (a version-4 lbfgs config ran without it: 0).
schema/migrate.py lifts older ones to the current version, or refuses them in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr

from superweight.core.conditions import BROKEN, ablated_weights
from superweight.display import Shown
from superweight.schema.compensation import Compensation, Exclusion, RegimeResult
from superweight.schema.detect import Candidate
from superweight.schema.base import Record
from superweight.schema.sinks import Sinks
from superweight.engine.config import RepairConfig
from superweight.schema.training import Check, Training  # noqa: F401 (Check: re-exported, a part of the record)

SCHEMA_VERSION = 5


# --- measurements and how they were made ---
class Metrics(Record):
    nll: float = Field(description="mean next-token negative log-likelihood (nats) over scored tokens")
    ppl: float = Field(description="exp(nll)")
    kl: float = Field(description="mean KL(base || this) per scored token, nats; 0 for base")
    top1_agree: float = Field(description="fraction of scored tokens whose argmax matches the base model's")
    super_activation: float | None = Field(
        None, description="max |value| over the watched residual channels after their layer (all positions)"
    )
    super_activation_by_channel: dict[str, float] = Field(
        default_factory=dict, description="'LAYER:ROW' -> max |residual[..., ROW]| after block LAYER"
    )
    n_tokens: int = Field(description="number of scored tokens")


class Protocol(Record):
    """How a set of numbers was produced; stored beside them (measure/metrics.protocol_of makes one)."""

    model: str
    model_source: str
    corpus: str
    split: str
    n_tokens: int = Field(description="scored tokens per condition")
    max_length: int
    stride: int
    dtype: str
    device: str
    dtype_reason: str | None = Field(None, description="why --dtype auto chose this dtype (None: given by the user)")
    device_map: str | None = Field(None, description="--device-map as given, when layers were spread or offloaded")
    bos: int | None = Field(None, description="token id every window starts with (None: none)")
    interventions: dict[str, str] = Field(default_factory=dict, description="condition name -> what it does")
    provenance: dict[str, Any] = Field(default_factory=dict)


class Recovery(Record):
    nll_gap: float | None = Field(description="(NLL_broken - NLL_x) / (NLL_broken - NLL_base); null if no gap")
    kl: float | None = Field(description="1 - KL_x / KL_broken; null when KL_broken is 0")


# measure/recovery.verdict_of; "nothing to repair": the ablation did no measurable damage (both recoveries null)
Verdict = Literal["repaired", "partial", "failed", "nothing to repair"]
class Baseline(Metrics):
    recovery: Recovery
    interval: list[float] | None = Field(None, description="95% interval of the NLL-gap recovery (block bootstrap "
                                                           "over the tokens it was scored on, n_tokens)")


# --- the patch ---
class ColGeometry(Record):
    col: int = Field(description="an ablated column in this row")
    value_at_col: float = Field(description="d[col]")
    deleted_value: float = Field(description="what the ablation removed from W[row, col]")
    cos_ablated_direction: float = Field(description="cos(d, e_col)")
    value_ratio: float | None = Field(None, description="d[col] / deleted value (invariant)")
    write_cos_ablated: float | None = Field(None, description="cos(x·d, x[col]) over tokens (invariant)")


class RowGeometry(Record):
    """One patched row; the ablated column's fields are those of the first ablated weight in this row."""

    layer: int
    row: int
    norm: float
    cos_original_row: float = Field(description="cos(d, the intact W[row, :])")
    expert: int | str | None = Field(None, description="the expert whose row it is (None: a dense MLP)")
    col: int | None = None
    value_at_col: float | None = None
    deleted_value: float | None = None
    cos_ablated_direction: float | None = None
    cols: list[ColGeometry] = Field(default_factory=list)
    top_entries: list[tuple[int, float]] = Field(default_factory=list, description="[neuron, d[neuron]] by |d|")
    # Invariant under rescaling a neuron without changing the model (measure/geometry.py says what each is):
    value_ratio: float | None = None
    write_cos_ablated: float | None = None
    balanced_norm: float | None = None
    write_rms: float | None = None
    write_vs_removed: float | None = Field(None, description="RMS(x·d) / RMS(x[col] · deleted value): invariant to "
                                                             "neuron, residual-stream and norm-gain rescaling")
    write_cos_original_row: float | None = None
    top_writes: list[tuple[int, float]] = Field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.layer}:{self.row}" if self.expert is None else f"{self.layer}:{self.expert}:{self.row}"


class PatchGeometry(RowGeometry):
    """The first patched row's geometry at the top level (the headline's), and every row's in `rows`."""

    rows: list[RowGeometry]


class SeedScores(Record):
    """One seed's patch (`seed` set), or the mean or standard deviation over the seeds (`seed` null)."""

    seed: int | None = None
    nll_gap: float | None = Field(description="null where the ablation did no NLL damage (Recovery)")
    kl: float | None = Field(description="null where the ablation did no KL damage (Recovery)")
    norm: float
    cos_original_row: float


class Seeds(Record):
    values: list[SeedScores] = Field(description="one per seed; the first is the saved patch")
    mean: SeedScores
    std: SeedScores = Field(description="sample standard deviation")


# --- analyses (`analyze`) ---
class Scored(Record):
    nll: float
    ppl: float
    kl: float
    nll_gap: float | None = Field(description="NLL-gap recovery; null where the ablation did no NLL damage")
    kl_recovery: float | None = Field(description="KL recovery; null where the ablation did no KL damage")


class RandomScored(Scored):
    draws: int


class SparsityPoint(Record):
    """The patch cut to its k largest-|d| entries (top level), its k largest |x·d| (by_contribution), k random."""

    k: int
    nll: float
    ppl: float
    kl: float
    nll_gap: float | None = Field(description="null where the ablation did no NLL damage (Recovery)")
    kl_recovery: float | None = Field(description="null where the ablation did no KL damage (Recovery)")
    by_contribution: Scored
    random: RandomScored | None = Field(None, description="k random entries, mean of the draws; null where the "
                                                          "adaptive search ran no random control at this k")


class TokenSum(Record):
    token: str
    id: int
    count: int
    sum: float
    mean: float


class TokenRise(Record):
    token: str
    id: int
    base_prob: float
    broken_prob: float
    delta: float


class LensToken(Record):
    token: str
    id: int
    logit: float


class LogitLens(Record):
    layer: int
    row: int
    top: list[LensToken]
    bottom: list[LensToken]


class Tokens(Record):
    n_tokens: int
    hurt: list[TokenSum]
    healed: list[TokenSum]
    rising: list[TokenRise]
    logit_lens: LogitLens


class Context(Record):
    text: str
    token: str
    position: int
    activation: float
    contribution: float


class Neuron(Record):
    neuron: int
    value: float
    contexts: list[Context]


class WriteNeuron(Record):
    neuron: int
    x: float
    d: float
    contribution: float


class PatchOutput(Record):
    text: str
    token: str
    position: int
    value: float = Field(description="x @ d at the token where it is largest")
    median_abs: float
    removed: float | None = Field(description="x[col] * deleted value there")
    top_neurons: list[WriteNeuron]


class SweepPoint(Record):
    """The weight scaled: `analyze`'s sweep in the record (label "base" at scale 1, else "scale{s}") and
    `superweight sweep`'s points (labels "x{s}" and "spread{n}": core/conditions.py)."""

    label: str = Field(description="condition name: base, scale<s>, x<s> or spread<n>")
    scale: float | None = Field(description="factor the weight was multiplied by (None for spread)")
    metrics: Metrics


class Analysis(Record):
    protocol: Protocol
    draws: int
    seconds: float
    subset_tokens: int | None = Field(None, description="the scale sweep and the random-k controls ran on the "
                                                        "first eval tokens only, this many (None: on all)")


# --- sparse training (`sparsify`) ---
class SparsePoint(Record):
    method: str
    strength: float
    nnz: int
    nll: float
    ppl: float
    kl: float
    nll_gap: float | None = Field(description="null where the ablation did no NLL damage (Recovery)")
    kl_recovery: float | None = Field(description="null where the ablation did no KL damage (Recovery)")
    seconds: float
    norm: float | None = None
    cos_original_row: float | None = None
    col: int | None = None
    value_at_col: float | None = None
    deleted_value: float | None = None
    cos_ablated_direction: float | None = None
    top_entries: list[tuple[int, float]] = Field(default_factory=list)


class SparseTraining(Record):
    protocol: Protocol
    steps: int
    lr: float
    points: list[SparsePoint]
    frontier: list[SparsePoint]
    smallest_90: SparsePoint | None


# --- detection (`run`) ---
class DetectSummary(Record):
    weight: str
    grade: str | None = Field(None, description="the chosen weight's grade; None when given with --weight")
    candidates: list[Candidate] = Field(default_factory=list)
    protocol: Protocol | None = None
    note: str | None = None


# --- zero-shot tasks (`--tasks` on eval / repair / run: lm-evaluation-harness, measure/tasks.py) ---
class TaskScore(Record):
    value: float
    stderr: float | None = Field(None, description="the harness's standard error; None where it gives none")


class TaskResults(Record):
    """The same model's lm-eval metrics per condition (base, broken or ablated, patched)."""

    harness: str = Field(description="lm-eval version")
    tasks: dict[str, dict[str, Any]] = Field(description="task -> version, n_shot, samples (items scored)")
    settings: dict[str, Any] = Field(description="limit, include_path, batch_size, softmax_dtype")
    scores: dict[str, dict[str, dict[str, TaskScore]]] = Field(description="condition -> task -> metric -> score")


# --- the cost account (`run`) ---
class StageCost(Record):
    forward: float = Field(description="forward work in eval-pass equivalents (tokens x decoder layers run, over "
                                       "the unit's)")
    backward: float = Field(0.0, description="backward work, same unit (a backward pass costs about two forward)")
    seconds: float | None = Field(None, description="wall seconds of the stage (as timings)")
    parts: dict[str, float] = Field(default_factory=dict, description="forward + backward eval-pass equivalents of "
                                                                      "each part (training, a condition, a view)")


class CostAccount(Record):
    unit: int = Field(description="token-layers of one eval pass: the eval tokens (BOS included) x decoder layers")
    eval_tokens: int = Field(description="tokens one forward pass over the run's eval text feeds")
    layers: int = Field(description="decoder layers of the model")
    stages: dict[str, StageCost] = Field(description="per stage, in the order they ran")
    total: float = Field(description="forward + backward eval-pass equivalents of every stage")


class RunRecord(Shown, Record):
    """results.json. `repair` writes the fields up to `seeds`; the rest stay None until their stage runs."""

    # The directory it was read from or written to (io/rundir.py), not part of results.json: a notebook shows
    # the run's loss curve and quantization from it.
    _run_dir: Path | None = PrivateAttr(None)

    schema_version: int = SCHEMA_VERSION
    protocol: Protocol
    recipe: str
    config: RepairConfig = Field(description="the training settings that ran (engine/config.py: LbfgsConfig | "
                                             "FirstOrderConfig, told apart by `optimizer`)")
    base: Metrics
    broken: Metrics
    patched: Metrics
    recovery: Recovery
    verdict: Verdict | None = Field(None, description="repaired / partial / failed, from `recovery` (verdict_of); "
                                                      "null in runs made before it existed")
    training: Training
    patch: PatchGeometry
    generations: list[dict[str, str]] = Field(default_factory=list)
    baselines: dict[str, Baseline] | None = None
    seeds: Seeds | None = None
    tasks: TaskResults | None = None  # repair / run --tasks
    exclusion: Exclusion | None = None  # repair --exclude: the columns held at 0
    regime: RegimeResult | None = None  # run: the repair without the deleted weight beside it
    # analyze
    super_activation: dict[str, float | None] | None = None
    sparsity: list[SparsityPoint] | None = None
    tokens: Tokens | None = None
    neurons: list[Neuron] | None = None
    patch_output: PatchOutput | None = None
    sweep: list[SweepPoint] | None = None
    sinks: Sinks | None = None
    analysis: Analysis | None = None
    # sparsify
    sparse_training: SparseTraining | None = None
    # compensate
    compensation: Compensation | None = None
    # run
    detect: DetectSummary | None = None
    timings: dict[str, float] | None = None
    cost: CostAccount | None = Field(None, description="the model work of each stage in eval-pass equivalents "
                                                       "(null in runs made before the account)")

    def conditions(self) -> list[tuple[str, Metrics, Recovery | None]]:
        """(name, metrics, recovery) for base, broken, patched and every baseline."""
        out = [("base", self.base, None), ("broken", self.broken, None), ("patched", self.patched, self.recovery)]
        return out + [(n, m, m.recovery) for n, m in (self.baselines or {}).items()]

    @property
    def weight(self) -> str:
        """The weight detection chose, else the ablated weights as `repair` was given them ("1:5:7, 1:9:3")."""
        if self.detect is not None:
            return self.detect.weight
        return ablated_weights(self.protocol.interventions.get(BROKEN.name(), ""))


def smallest_k(sparsity: list[SparsityPoint], target: float = 0.9, ranking: str | None = None) -> int | None:
    """The fewest entries whose cut patch recovers `target` of the NLL gap, or None: entries kept by largest |d|
    (the top level of each point), or by `ranking` ("by_contribution", "random")."""
    for e in sorted(sparsity, key=lambda e: e.k):
        point = getattr(e, ranking) if ranking else e
        if point is not None and point.nll_gap is not None and point.nll_gap >= target:
            return e.k
    return None
