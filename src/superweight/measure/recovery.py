"""Recovery: how much of the damage an ablation did a condition undoes (1 = fully repaired, 0 = as broken).

    recovery(base, broken, patched)   # Recovery(nll_gap=0.93, kl=0.95)
"""

from __future__ import annotations

from superweight.io.record import Metrics, Recovery


def recovery(base: Metrics, broken: Metrics, patched: Metrics) -> Recovery:
    """NLL-gap closure and KL closure (1 = fully repaired, 0 = as broken); None where the ablation did no
    damage of that kind (strict JSON has no NaN: results.json says null, and docs/results.md why)."""
    gap = broken.nll - base.nll
    return Recovery(
        nll_gap=(broken.nll - patched.nll) / gap if gap else None,
        kl=1 - patched.kl / broken.kl if broken.kl else None,
    )
