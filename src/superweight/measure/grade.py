"""What a weight's measured damage makes of it: a super weight, a sensitive weight, or nothing.

    grade(kl=1.5, ppl_ratio=5.2, controls_kl=2e-4, confirmed=True, control_factor=10)   # "super weight"
    grade_words("sensitive weight")    # the phrase every output (run, detect, report) uses

The thresholds and their reasons live here only; `stages/detect.py` grades each verified candidate with them.
"""

from __future__ import annotations

# A super weight in the paper's sense collapses the model when zeroed: Llama-7B's PPL goes from 5.7 to over
# 1,000 (Yu et al. 2024), OLMo-1B's from 17 to 2,884, the embedded SmolLM2-135M's from 17 to 131 (x7.5). A
# weight far above its controls that costs a model 10-50% of perplexity is a sensitive weight, not a collapse.
SUPER_PPL_RATIO = 2.0  # zeroing it at least doubles perplexity (and it is `confirmed` against its controls) ...
# ... or moves the predictions by at least this KL (nats/token; SmolLM2-135M: 1.5, OLMo-1B: 5.0). The PPL ratio
# understates a collapse on a model that is already unsure (a random model's PPL is near its vocabulary size);
# a weight that costs 10% of perplexity moves the predictions by ~0.1.
SUPER_KL = 0.5
SENSITIVE_MIN_KL = 0.01  # nats/token: below this, even a weight far above its controls changes little
GRADES = {
    "super weight": f"confirmed, and zeroing it multiplies perplexity by {SUPER_PPL_RATIO:g} or more or costs "
                    f"{SUPER_KL:g} nats/token of KL or more: the model collapses",
    "sensitive weight": f"zeroing it costs at least {SENSITIVE_MIN_KL:g} nats/token of KL and the control factor "
                        f"x its controls, but less than a collapse: not a super weight",
    "none": "its damage is within the controls' reach or negligible: not a super weight",
}


def grade(kl: float, ppl_ratio: float, controls_kl: float, confirmed: bool, control_factor: float) -> str:
    """One of GRADES' keys for a verified candidate."""
    if confirmed and (ppl_ratio >= SUPER_PPL_RATIO or kl >= SUPER_KL):
        return "super weight"
    if kl >= SENSITIVE_MIN_KL and kl >= control_factor * controls_kl:
        return "sensitive weight"
    return "none"


def grade_words(g: str | None) -> str:
    """How outputs name a weight of grade `g` (None: a weight given by hand, not graded)."""
    return {"super weight": "a super weight", "sensitive weight": "a sensitive weight (not a super weight)",
            "none": "not a super weight (damage within its controls' reach)"}.get(g, "a weight given by hand (not graded)")


def expert_grade(kl: float, ppl_ratio: float, controls_kl: float, confirmed: bool, control_factor: float) -> str:
    """The grade of a whole pruned expert (stages/experts.py), by the same thresholds: "super expert" (pruning it
    collapses the model), "sensitive expert" or "none"."""
    return grade(kl, ppl_ratio, controls_kl, confirmed, control_factor).replace("weight", "expert")
