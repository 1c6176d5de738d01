"""Recovery: how much of the damage an ablation did a condition undoes (1 = fully repaired, 0 = as broken).

    recovery(base, broken, patched)   # Recovery(nll_gap=0.93, kl=0.95)
    recovery_of(metrics, "oracle")    # the same, from measure()'s results by condition name
    scored(m, base, broken)           # Scored: NLL, PPL, KL and both recoveries, as a record row holds them
    verdict_of(rec)                   # "repaired" / "partial" / "failed" / "nothing to repair"
"""

from __future__ import annotations

from superweight.core.conditions import BROKEN
from superweight.io.record import Metrics, Recovery, Scored, Verdict

REPAIRED = 0.9  # both recoveries at least this: "repaired"
# An ablation whose KL to the intact model is at most this (nats/token) did no measurable damage: the two models
# predict the same, and NLL moves by rounding (first order in the tiny logit change, where KL is second order).
# Its recoveries are undefined (None), not a ratio of two rounding errors; so is an NLL gap this small either way.
NO_DAMAGE = 1e-5


def verdict_of(rec: Recovery) -> Verdict:
    """repaired: NLL-gap and KL recovery >= 90%; failed: the patched model is no better than the broken one on
    either (recovery <= 0, a patch that does harm); partial: in between. A missing number does not count;
    both missing: "nothing to repair" (the ablation did no measurable damage, so no patch can recover any)."""
    values = [v for v in (rec.nll_gap, rec.kl) if v is not None]
    if not values:
        return "nothing to repair"
    if any(v <= 0 for v in values):
        return "failed"
    return "repaired" if all(v >= REPAIRED for v in values) else "partial"


def recovery(base: Metrics, broken: Metrics, patched: Metrics) -> Recovery:
    """NLL-gap closure and KL closure (1 = fully repaired, 0 = as broken); None where the ablation did no
    measurable damage of that kind (at most NO_DAMAGE) (strict JSON has no NaN: results.json says null, and docs/results.md why)."""
    gap, damaged = broken.nll - base.nll, broken.kl > NO_DAMAGE
    return Recovery(
        nll_gap=(broken.nll - patched.nll) / gap if damaged and abs(gap) > NO_DAMAGE else None,
        kl=1 - patched.kl / broken.kl if damaged else None,
    )


def recovery_of(metrics: dict[str, Metrics], name: str) -> Recovery:
    """The recovery of condition `name` in measure()'s results, against their base and broken."""
    return recovery(metrics["base"], metrics[BROKEN.name()], metrics[name])


def scored(m: Metrics, base: Metrics, broken: Metrics) -> Scored:
    """A condition's NLL, PPL and KL, and how much of the damage it undoes."""
    rec = recovery(base, broken, m)
    return Scored(nll=m.nll, ppl=m.ppl, kl=m.kl, nll_gap=rec.nll_gap, kl_recovery=rec.kl)
