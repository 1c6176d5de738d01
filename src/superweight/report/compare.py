"""One flat row per run directory, for a table comparing runs (`superweight compare`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from superweight.display import Shown
from superweight.measure.geometry import regime_of
from superweight.schema.record import smallest_k
from superweight.io.rundir import RunDir


class CompareRow(BaseModel):
    """One run, flattened; None where the run has no such value (e.g. no analysis, one seed)."""

    run: str
    model: str
    weight: str
    recipe: str
    steps: int
    seed: int | None
    base_ppl: float
    broken_ppl: float
    patched_ppl: float
    nll_gap: float | None  # None: the ablation did no damage (report/format.NO_DAMAGE)
    kl_recovery: float | None
    norm: float
    cos_original_row: float
    write_rms: float | None
    write_vs_removed: float | None
    balanced_norm: float | None
    value_at_col: float | None
    k90: int | None
    k90_contribution: int | None
    sparse_nnz90: int | None
    seeds: int | None
    seeds_nll_gap_mean: float | None
    seeds_nll_gap_std: float | None
    n_tokens: int
    seconds: float
    excluded: str | None = None  # repair --exclude: the specs
    regime: str | None = None  # restoration or compensation (measure/geometry.regime_of)


class Comparison(Shown, list):
    """The rows of `compare_rows`: a plain list of CompareRow, shown as the comparison table in a notebook."""


def compare_rows(run_dirs: list[str | Path]) -> Comparison:
    """One row per run directory, in the order given."""
    rows = []
    for run_dir in run_dirs:
        r = RunDir(Path(run_dir)).record()
        smallest = r.sparse_training.smallest_90 if r.sparse_training else None
        rows.append(CompareRow(
            run=Path(run_dir).resolve().name, model=r.protocol.model, weight=r.weight, recipe=r.recipe,
            steps=r.training.steps, seed=r.config.seed, base_ppl=r.base.ppl, broken_ppl=r.broken.ppl,
            patched_ppl=r.patched.ppl, nll_gap=r.recovery.nll_gap, kl_recovery=r.recovery.kl, norm=r.patch.norm,
            cos_original_row=r.patch.cos_original_row, value_at_col=r.patch.value_at_col,
            write_rms=r.patch.write_rms, write_vs_removed=r.patch.write_vs_removed, balanced_norm=r.patch.balanced_norm,
            k90=smallest_k(r.sparsity or []), k90_contribution=smallest_k(r.sparsity or [], ranking="by_contribution"),
            sparse_nnz90=smallest.nnz if smallest else None,
            seeds=len(r.seeds.values) if r.seeds else None,
            seeds_nll_gap_mean=r.seeds.mean.nll_gap if r.seeds else None,
            seeds_nll_gap_std=r.seeds.std.nll_gap if r.seeds else None,
            n_tokens=r.protocol.n_tokens, seconds=r.training.seconds,
            excluded=" ".join(r.exclusion.specs) if r.exclusion else None,
            regime=r.regime.regime if r.regime else regime_of(r.patch.value_ratio) if r.patch.col is not None else None,
        ))
    return Comparison(rows)
