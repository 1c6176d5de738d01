"""Recovery: how much of the damage an ablation did a condition undoes (1 = fully repaired, 0 = as broken).

    recovery(base, broken, patched)   # Recovery(nll_gap=0.93, kl=0.95)
    recovery_of(metrics, "oracle")    # the same, from measure()'s results by condition name
    scored(m, base, broken)           # Scored: NLL, PPL, KL and both recoveries, as a record row holds them
    verdict_of(rec)                   # "repaired" / "partial" / "failed" / "nothing to repair"
"""

from __future__ import annotations

from superweight.core.conditions import BROKEN
from superweight.schema.record import Metrics, Recovery, Scored, Verdict

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


BLOCK = 32  # tokens per bootstrap block (neighbouring tokens' losses are correlated)


class TokenNLL:
    """A `measure` observer keeping the per-token NLL of the named conditions, in token order (on the device
    until read)."""

    def __init__(self, names):
        self.parts = {name: [] for name in names}

    def __call__(self, name, lp, labels) -> None:
        if name in self.parts:
            self.parts[name].append(-lp.gather(-1, labels[:, None])[:, 0])

    def __getitem__(self, name):
        import torch

        return torch.cat(self.parts[name]).cpu()


def nll_gap_interval(base, broken, other, level: float = 0.95, draws: int = 2000,
                     seed: int = 0) -> tuple[float, float] | None:
    """The `level` interval of the NLL-gap recovery of `other` from per-token NLLs of the same tokens (1-d tensors;
    the first n of each, n the shortest), by a bootstrap over blocks of BLOCK consecutive tokens; None when the
    ablation made no gap on some resample or there are fewer than two blocks."""
    import torch

    n = min(len(base), len(broken), len(other)) // BLOCK * BLOCK
    if n < 2 * BLOCK:
        return None
    sums = [x[:n].double().reshape(-1, BLOCK).sum(1) for x in (base, broken, other)]
    pick = torch.randint(n // BLOCK, (draws, n // BLOCK), generator=torch.Generator().manual_seed(seed))
    a, b, x = (s[pick].sum(1) for s in sums)
    gap = b - a
    if bool((gap == 0).any()):
        return None
    rec = ((b - x) / gap).sort().values
    tail = (1 - level) / 2
    return float(rec[int(tail * (draws - 1))]), float(rec[int((1 - tail) * (draws - 1))])


def scored(m: Metrics, base: Metrics, broken: Metrics) -> Scored:
    """A condition's NLL, PPL and KL, and how much of the damage it undoes."""
    rec = recovery(base, broken, m)
    return Scored(nll=m.nll, ppl=m.ppl, kl=m.kl, nll_gap=rec.nll_gap, kl_recovery=rec.kl)
