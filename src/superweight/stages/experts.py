"""Verify super experts: prune each candidate's whole expert beside two control experts, and say how often the
router picks it at the massive-activation tokens.

Su et al. (2025) find "super experts" in MoE LLMs: experts whose down-projection writes the massive activation,
and whose removal collapses the model. Detection (stages/detect.py) finds a candidate weight inside an expert;
here the whole expert is pruned (core/intervene.ExpertPrune: its router logit -> -inf, so the router picks
another; a shared expert's output -> 0), graded against pruning two other routed experts of the same layer with
the thresholds of measure/grade.py: the busiest one (most tokens routed to it) and a random one.

    plan = plan_experts(model, ids, candidates, max_length, bos, seed)
    conditions.update(plan.conditions)           # measured beside the single-weight ablations
    candidate = revalidated(candidate, **plan.result(candidate, results, min_kl, control_factor))
"""

from __future__ import annotations

import torch
from torch import nn

from superweight.core.arch import moe_block
from superweight.core.coords import SHARED
from superweight.core.intervene import ExpertPrune, Intervention
from superweight.io.corpora import NO_BOS, Bos
from superweight.measure.grade import expert_grade
from superweight.measure.inputs import router_choices

# A token carries the massive activation of channel `row` after the layer when |residual[row]| is at least this
# share of its largest value over the calibration text (real models: the first token and a few delimiters).
MASSIVE = 0.5
EXPERT_PRUNING = ("pruned whole (router logit -inf; a shared expert's output 0), beside the busiest and a random "
                  "other expert of its layer")


class ExpertPlan:
    """The pruning conditions of every candidate expert and its layer's controls, and the routing numbers."""

    def __init__(self):
        self.conditions: dict[str, Intervention] = {}
        self.controls: dict[int, list[tuple[str, str]]] = {}  # layer -> [(condition name, expert)] (top, random)
        self.picks: dict[tuple, tuple[float, float, int]] = {}  # (layer, expert, row) -> (massive, all, n massive)

    def result(self, c, results: dict, min_kl: float, control_factor: float) -> dict:
        """The expert fields of candidate `c` (stages/detect.Candidate) from measure()'s results."""
        if c.expert is None:
            return {}
        m, base = results[_name(c.layer, c.expert)], results["base"]
        ctrl = [results[name].kl for name, _ in self.controls[c.layer]]
        worst = max(ctrl, default=0.0)
        confirmed = m.kl >= min_kl and m.kl >= control_factor * worst
        massive, everywhere, n = self.picks[(c.layer, c.expert, c.row)]
        return {
            "expert_kl": m.kl, "expert_ppl_ratio": m.ppl / base.ppl,
            "expert_control_kl_top": ctrl[0] if ctrl else None,
            "expert_control_kl_random": ctrl[1] if len(ctrl) > 1 else None,
            "expert_controls": [e for _, e in self.controls[c.layer]], "expert_confirmed": confirmed,
            "expert_grade": expert_grade(m.kl, m.ppl / base.ppl, worst, confirmed, control_factor),
            "expert_picked": massive, "expert_picked_all": everywhere, "massive_tokens": n,
        }


def _name(layer: int, expert) -> str:
    return f"prune:{layer}:{expert}"


def plan_experts(model: nn.Module, ids: torch.Tensor, candidates, max_length: int = 512, bos: Bos = NO_BOS,
                 seed: int = 0) -> ExpertPlan:
    """Conditions pruning each candidate's expert and two control experts per layer, and each candidate's
    routing at its massive tokens (intact model, calibration text `ids`)."""
    plan = ExpertPlan()
    by_layer: dict[int, set] = {}
    for c in candidates:
        if c.expert is not None:
            by_layer.setdefault(c.layer, set()).add(c.expert)
    for layer, experts in by_layer.items():
        n = moe_block(model, layer)[0].down_proj.shape[0]
        index, resid = router_choices(model, ids, layer, max_length, bos)
        counts = torch.bincount(index.flatten(), minlength=n)
        for e in experts:
            plan.conditions[_name(layer, e)] = ExpertPrune(model, [(layer, e)])
        others = [e for e in range(n) if e not in experts]
        chosen = []
        if others:
            chosen.append(max(others, key=lambda e: (int(counts[e]), -e)))  # the busiest other expert
            rest = [e for e in others if e != chosen[0]]
            if rest:
                gen = torch.Generator().manual_seed(seed + layer)
                chosen.append(rest[int(torch.randint(len(rest), (1,), generator=gen))])
        plan.controls[layer] = []
        for kind, e in zip(("top", "random"), chosen):
            name = f"prune_{kind}:{layer}"
            plan.conditions[name] = ExpertPrune(model, [(layer, e)])
            plan.controls[layer].append((name, str(e)))
        for c in candidates:
            if c.layer == layer and c.expert is not None:
                plan.picks[(layer, c.expert, c.row)] = _picks(index, resid[:, c.row], c.expert)
    return plan


def _picks(index: torch.Tensor, channel: torch.Tensor, expert) -> tuple[float, float, int]:
    """(share of the massive tokens routed to `expert`, share of all tokens, number of massive tokens)."""
    massive = channel.abs() >= MASSIVE * channel.abs().max()
    if expert == SHARED:  # on every token
        return 1.0, 1.0, int(massive.sum())
    routed = (index == expert).any(-1)
    return routed[massive].float().mean().item(), routed.float().mean().item(), int(massive.sum())
