"""How much of the patch the repair needs: the patch cut to k entries, ranked three ways, and scored.

    by_contribution, inputs = contribution_scores(model, ids, patch, max_length)
    conds = sparsity_conditions(model, ablation, patch, draws, by_contribution)   # top{k}, contrib{k}, rand{k}_{j}
    table = sparsity_table(metrics, n, draws)                                     # [SparsityPoint(k=1, ...), ...]

k runs over 1, 2, 4, ... up to the patch's size n; "top" keeps the k largest |d|, "contrib" the k largest
|x * d| at the token where the patch writes most, "rand" k random entries (`draws` draws, averaged).
"""

from __future__ import annotations

import torch

from superweight.core.conditions import CONTRIB_K, RANDOM_K, TOP_K, Condition
from superweight.core.coords import site, split_row
from superweight.core.intervene import Ablation
from superweight.core.patching import PatchData, patched
from superweight.io.corpora import NO_BOS, Bos
from superweight.schema.record import Metrics, RandomScored, Scored, SparsityPoint
from superweight.measure.inputs import down_inputs
from superweight.measure.recovery import scored


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def keep_entries(vectors: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
    """The patch with only the entries at `keep` (indices into the concatenated vectors), the rest zero."""
    flat = torch.cat([v.detach().float().cpu() for v in vectors])
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return list(out.split([v.numel() for v in vectors]))


def contribution_scores(model, ids, patch: PatchData, max_length: int,
                        bos: Bos = NO_BOS) -> tuple[torch.Tensor, dict]:
    """|x[t, i] * d[i]| for every patch entry (rows concatenated), t the token where that row's write x @ d is
    largest; and the down-projection inputs per layer, for the token and neuron views (windows start with `bos`
    when given: x has a row per BOS too, see measure/inputs.seen_ids)."""
    inputs, scores = {}, []  # keyed by coords.site: the layer, or (layer, expert)
    for r, v in zip(patch.rows, patch.vectors):
        if site(r) not in inputs:
            inputs[site(r)] = down_inputs(model, ids, r[0], max_length, bos, split_row(r)[2])
        x = inputs[site(r)][0]
        t = int((x @ v.float()).abs().argmax())
        scores.append((x[t] * v.float()).abs())
    return torch.cat(scores), inputs


TARGET = 0.9  # the recoveries the smallest k is sought for: this much, and this much of the full patch's


def _cut(model, ablation: Ablation, patch: PatchData, keep) -> object:
    return patched(model, ablation, patch.rows, keep_entries(patch.vectors, keep))


def random_entries(n: int, k: int, j: int, seed: int = 0) -> torch.Tensor:
    """Draw j of k random entries out of n: seeded by (seed, k, j), the same whichever other k are measured."""
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + k) * 101 + j))[:k]


def sparsity_conditions(model, ablation: Ablation, patch: PatchData, draws: int, by_contribution: torch.Tensor,
                        ks: list[int] | None = None, random_ks: list[int] | None = None,
                        same: dict[str, str] | None = None) -> list[Condition]:
    """The patch cut to k entries, for k in `ks` (None: 1, 2, 4, ..., n): "top{k}" keeps the k largest |d|,
    "contrib{k}" the k largest |x * d| at the token where the patch writes most; "rand{k}_{j}" keeps k random
    ones (draw j), for k in `random_ks` (None: every k below n; with every entry kept random-k is the patch).
    `same`: a "contrib{k}" that keeps the very entries of "top{k}" is then not built but recorded there
    ({contrib name: top name}): the same patch, measured once."""
    flat = torch.cat([v.float() for v in patch.vectors])
    n = flat.numel()
    orders = ((TOP_K, flat.abs().argsort(descending=True)), (CONTRIB_K, by_contribution.argsort(descending=True)))
    ks = powers_of_two(n) if ks is None else ks
    random_ks = ks if random_ks is None else random_ks
    conditions: list[Condition] = []
    for k in ks:
        if same is not None and set(orders[0][1][:k].tolist()) == set(orders[1][1][:k].tolist()):
            same[CONTRIB_K.name(k=k)] = TOP_K.name(k=k)
            conditions.append(TOP_K(_cut(model, ablation, patch, orders[0][1][:k]), k=k))
            continue
        conditions += [family(_cut(model, ablation, patch, order[:k]), k=k) for family, order in orders]
    for k in random_ks:
        if k < n:
            conditions += [RANDOM_K(_cut(model, ablation, patch, random_entries(n, k, j)), k=k, j=j, draws=draws)
                           for j in range(draws)]
    return conditions


class SparsitySearch:
    """The smallest k whose cut patch recovers TARGET of the NLL gap (by |d| and by |x·d|), and TARGET of the
    full patch's recovery (by |d|), found by bisection over the grid 1, 2, 4, ..., n instead of measuring
    every k: the curve rises with k, so the smallest grid k at or above a target lies between the largest
    measured k below it and the smallest measured k at or above it. The full patch (k = n) is the patched
    model itself. Random-k controls run at the k values the answers name (and at k = 1 with the first round,
    where a super weight's answer usually lies).

        search = SparsitySearch(model, ablation, patch, draws, by_contribution)
        metrics = measure(..., [*search.start(), ...])      # k = 1 beside the analysis' other conditions
        while (more := search.next(metrics)):
            metrics |= measure(..., more)                   # the next midpoints, then the random controls
        table = search.table(metrics)
    """

    def __init__(self, model, ablation: Ablation, patch: PatchData, draws: int, by_contribution: torch.Tensor,
                 random_tokens: int | None = None):
        self.args = (model, ablation, patch, draws, by_contribution)
        self.random_tokens = random_tokens  # random-k runs on measure's subset of this many tokens (None: all)
        self.n = sum(v.numel() for v in patch.vectors)
        self.grid = powers_of_two(self.n)
        self.draws = draws
        self.same: dict[str, str] = {}  # a cut ranked by |x·d| that is the |d| one's: measured once

    def start(self) -> list[Condition]:
        return sparsity_conditions(*self.args, ks=[1], random_ks=[1], same=self.same) if self.n > 1 else []

    def subsets(self, conditions: list[Condition]) -> dict[str, int]:
        """measure's Scoring.subsets for the random controls among `conditions` (their tokens, when fewer)."""
        return {c.name: self.random_tokens for c in conditions if c.name in RANDOM_K} if self.random_tokens else {}

    def _whole(self, metrics: dict[str, Metrics]) -> dict[str, Metrics]:
        return metrics | {a: metrics[b] for a, b in self.same.items() if b in metrics}

    def _gaps(self, metrics: dict[str, Metrics]) -> dict[int, tuple[float, float]]:
        metrics = self._whole(metrics)
        base, broken = metrics["base"], metrics["broken"]
        out = {self.n: (scored(metrics["patched"], base, broken).nll_gap,) * 2}
        for k in self.grid:
            if TOP_K.name(k=k) in metrics:
                out[k] = (scored(metrics[TOP_K.name(k=k)], base, broken).nll_gap,
                          scored(metrics[CONTRIB_K.name(k=k)], base, broken).nll_gap)
        return {k: tuple(-float("inf") if v is None else v for v in gaps) for k, gaps in out.items()}

    def answers(self, metrics: dict[str, Metrics]) -> tuple[set[int], set[int]]:
        """(the k each open search measures next, the answers found so far)."""
        gaps = self._gaps(metrics)
        dense = gaps[self.n][0]
        todo, found = set(), set()
        for ranking, target in ((0, TARGET), (1, TARGET), (0, TARGET * dense)):
            hi = min((k for k, g in gaps.items() if g[ranking] >= target), default=None)
            if hi is None:
                continue  # not even the full patch reaches it
            lo = max((k for k in gaps if k < hi), default=None)
            i_lo, i_hi = (self.grid.index(lo) if lo is not None else -1), self.grid.index(hi)
            if i_hi - i_lo > 1:
                todo.add(self.grid[(i_lo + i_hi + 1) // 2])
            else:
                found.add(hi)
        return todo, found

    def next(self, metrics: dict[str, Metrics]) -> list[Condition]:
        """The conditions of the next round: midpoints while a search is open, then the random controls at the
        answers that lack them; [] when done."""
        todo, found = self.answers(metrics)
        if todo:
            return sparsity_conditions(*self.args, ks=sorted(todo), random_ks=[], same=self.same)
        missing = [k for k in sorted(found) if k < self.n and RANDOM_K.name(k=k, j=0) not in metrics]
        return sparsity_conditions(*self.args, ks=[], random_ks=missing)

    def table(self, metrics: dict[str, Metrics]) -> list[SparsityPoint]:
        return sparsity_table(self._whole(metrics), self.n, self.draws, self.random_tokens)


def sparsity_table(metrics: dict[str, Metrics], n: int, draws: int,
                   random_tokens: int | None = None) -> list[SparsityPoint]:
    """Per measured k (and k = n, the patched model), the top-k patch's scores, the contribution-ranked one's,
    and the mean of the random draws where they ran (else None). `random_tokens`: the draws ran on measure's
    subset of that many tokens, and are scored against base and broken over the same tokens."""
    base, broken = metrics["base"], metrics["broken"]
    at = f"@{random_tokens}" if random_tokens else ""
    r_base, r_broken = metrics[f"base{at}"], metrics.get(f"broken{at}")
    table = []
    for k in powers_of_two(n):
        if k < n and TOP_K.name(k=k) not in metrics:
            continue
        top = scored(metrics[TOP_K.name(k=k)] if k < n else metrics["patched"], base, broken)
        contrib = scored(metrics[CONTRIB_K.name(k=k)], base, broken) if k < n else top
        random = RandomScored(**top.model_dump(), draws=0) if k == n else None
        if k < n and RANDOM_K.name(k=k, j=0) in metrics:
            runs = [scored(metrics[RANDOM_K.name(k=k, j=j)], r_base, r_broken) for j in range(draws)]
            random = RandomScored(**{key: _mean([getattr(r, key) for r in runs]) for key in Scored.model_fields},
                                  draws=draws)
        table.append(SparsityPoint(k=k, **top.model_dump(), by_contribution=contrib, random=random))
    return table


def _mean(values):
    return None if any(v is None for v in values) else sum(values) / len(values)
