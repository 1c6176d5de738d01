"""The compensation parts of the run record (docs/results.md): `exclusion` (the columns a repair held at 0),
`regime` (`run`: the repair without the deleted weight beside the one with it) and `compensation` (the frontier
of `superweight compensate`). Beside schema/record.py, which imports them; stages/compensate.py writes them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from superweight.display import Shown
from superweight.schema.base import Record
from superweight.schema.training import Check

Regime = Literal["restoration", "compensation"]


class Exclusion(Record):
    """Columns of the patch held at exactly 0 through training (`repair --exclude`)."""

    specs: list[str] = Field(description="as given: deleted, top:K or column numbers")
    columns: dict[str, list[int]] = Field(description="patch row ('LAYER:ROW') -> the columns held at 0")
    ranked_by: str | None = Field(None, description="top:K: what ranked the neurons (the unconstrained repair's "
                                                    "per-neuron write, RMS of x_j d_j over the eval tokens)")


class WriteContext(Record):
    text: str
    token: str
    position: int
    activation: float
    contribution: float


class Writer(Record):
    """A neuron the patch writes through: its share of the write and where it fires most."""

    neuron: int
    write_rms: float = Field(description="RMS over tokens of x_j d_j")
    share: float = Field(description="its share of Σ_j RMS(x_j d_j)²")
    value: float = Field(description="d[j]")
    contexts: list[WriteContext] = Field(default_factory=list)


class CompensationPoint(Record):
    """One repair with some neurons excluded, scored on the eval tokens and by its held-out check."""

    label: str = Field(description="none, deleted, or top K (K writing neurons excluded)")
    k: int = Field(description="neurons excluded at this point (besides any the run itself excluded)")
    excluded: list[int] = Field(description="every column held at 0 in the first patch row")
    nll: float
    ppl: float
    kl: float
    nll_gap: float | None = Field(description="NLL-gap recovery on the eval tokens")
    kl_recovery: float | None = Field(description="KL recovery on the eval tokens")
    check: Check | None = Field(None, description="the repair's held-out check (train-split rows never trained on)")
    check_recovery: float | None = Field(None, description="1 - best_kl / broken_kl of the held-out check")
    norm: float
    cos_original_row: float
    value_ratio: float | None = Field(None, description="d[col] / deleted value")
    write_vs_removed: float | None = Field(None, description="RMS(x·d) / RMS(x[col]·deleted)")
    participation: float | None = Field(
        None, description="how many neurons carry the write: (Σ_j w_j²)² / Σ_j w_j⁴, w_j = RMS over tokens of x_j d_j")
    neurons: list[Writer] = Field(default_factory=list, description="the neurons that write most")
    evals: int = Field(description="loss evaluations (or steps) the repair ran")
    seconds: float
    final_loss: float | None = None


class Compensation(Shown, Record):
    """The compensation frontier: repairs with more and more of the writing neurons excluded (a notebook shows
    the report's section: the table, the figure and the neurons each point writes through)."""

    ranking: str = Field(description="how the excluded neurons are chosen (greedy: the top writers of the previous "
                                     "point's patch)")
    recipe: str
    row: str = Field(description="the patch row the exclusions apply to ('LAYER:ROW')")
    tokens: int = Field(description="eval-split tokens each point is scored on")
    stop_below: float = Field(description="the frontier stops once the held-out KL recovery falls below this")
    max_k: int = Field(description="the budget: the most neurons excluded")
    stopped: str = Field(description="why the frontier ended")
    points: list[CompensationPoint]
    seconds: float


class RegimeResult(Record):
    """`run`: which way the repair works, and the repair without the deleted weight beside it."""

    regime: Regime = Field(description="restoration: d[col] gives back at least half the deleted value; "
                                       "compensation: it repairs another way")
    value_ratio: float | None = Field(description="the run's d[col] / deleted value")
    without_deleted: CompensationPoint | None = Field(
        None, description="the repair with the deleted weights' columns held at 0")
