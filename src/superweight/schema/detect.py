"""A detection candidate, as detect.json and the run record's `detect.candidates` (schema/record.DetectSummary) both
hold it: one model for both files.

    record.detect.candidates[0].kl, record.detect.candidates[0].coord     # WeightCoord(layer=.., row=.., col=..)
"""

from __future__ import annotations

from pydantic import Field

from superweight.core.coords import WeightCoord
from superweight.schema.base import Record


class Candidate(Record):
    """A weight detection found, with the damage its removal does (stages/detect.py fills it in steps: found,
    then verified); results.json's `detect.candidates` holds them as detect.json does."""

    layer: int
    row: int
    col: int
    value: float = Field(description="the weight W[row, col] (before any ablation)")
    source: str = Field(description="'spike' (scan, iteration round n) or 'attribution:<method>'")
    in_spike: float | None = Field(None, description="max |down-proj input| at this column in the scan")
    out_spike: float | None = Field(None, description="max |down-proj output| at this row in the scan")
    spike_ratio: float | None = Field(None, description="out_spike / median over layers of the per-layer max")
    attribution: float | None = Field(None, description="attribution score (method in source)")
    kl: float | None = Field(None, description="KL(base || this weight zeroed), nats/token, calibration text")
    ppl_ratio: float | None = Field(None, description="PPL with this weight zeroed / base PPL")
    control_kl_top: float | None = Field(None, description="KL when zeroing the other weight that writes most "
                                                           "(|W[r,c]| * max_t |x_t[c]|)")
    control_kl_random: float | None = Field(None, description="KL when zeroing a random weight")
    controls: list[str] = Field(default_factory=list, description="the control coordinates [top, random]")
    confirmed: bool = Field(False, description="KL >= min_kl and >= control_factor x the worse control")
    grade: str | None = Field(None, description="super weight / sensitive weight / none (measure/grade.py), when "
                                                "verified")
    # Mixture of experts (stages/experts.py); None in a dense model.
    expert: int | str | None = Field(None, description="the expert (index, or 'shared') whose down-projection "
                                                       "holds the weight")
    expert_picked: float | None = Field(None, description="share of the massive-activation tokens (|residual[row]| "
                                                          ">= half its max after the layer) the router sends to it")
    expert_picked_all: float | None = Field(None, description="share of all calibration tokens routed to it")
    massive_tokens: int | None = Field(None, description="calibration tokens carrying the massive activation")
    expert_kl: float | None = Field(None, description="KL(base || whole expert pruned: router logit -inf)")
    expert_ppl_ratio: float | None = Field(None, description="PPL with the whole expert pruned / base PPL")
    expert_control_kl_top: float | None = Field(None, description="KL when pruning the busiest other expert")
    expert_control_kl_random: float | None = Field(None, description="KL when pruning a random other expert")
    expert_controls: list[str] = Field(default_factory=list, description="the control experts [busiest, random]")
    expert_confirmed: bool | None = Field(None, description="expert KL >= min_kl and >= control_factor x the worse "
                                                            "control expert's")
    expert_grade: str | None = Field(None, description="super expert / sensitive expert / none")

    @property
    def coord(self) -> WeightCoord:
        return WeightCoord(layer=self.layer, row=self.row, col=self.col, expert=self.expert)
