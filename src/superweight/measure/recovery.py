"""Recovery: how much of the damage an ablation did a condition undoes (1 = fully repaired, 0 = as broken).

    recovery(base, broken, patched)   # Recovery(nll_gap=0.93, kl=0.95)
"""

from __future__ import annotations

from superweight.io.record import Metrics, Recovery


def recovery(base: Metrics, broken: Metrics, patched: Metrics) -> Recovery:
    """NLL-gap closure and KL closure (1 = fully repaired, 0 = as broken)."""
    gap = broken.nll - base.nll
    return Recovery(
        nll_gap=(broken.nll - patched.nll) / gap if gap else float("nan"),
        kl=1 - patched.kl / broken.kl if broken.kl else float("nan"),
    )
