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
from superweight.io.record import Metrics, RandomScored, Scored, SparsityPoint
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


def sparsity_conditions(model, ablation: Ablation, patch: PatchData, draws: int, by_contribution: torch.Tensor,
                        seed: int = 0) -> list[Condition]:
    """The patch cut to k entries, for k in 1, 2, 4, ..., n: "top{k}" keeps the k largest |d|, "contrib{k}" the
    k largest |x * d| at the token where the patch writes most, "rand{k}_{j}" k random ones (draw j)."""
    flat = torch.cat([v.float() for v in patch.vectors])
    orders = ((TOP_K, flat.abs().argsort(descending=True)), (CONTRIB_K, by_contribution.argsort(descending=True)))
    gen = torch.Generator().manual_seed(seed)
    conditions: list[Condition] = []

    def cut(keep):
        return patched(model, ablation, patch.rows, keep_entries(patch.vectors, keep))

    for k in powers_of_two(flat.numel()):
        conditions += [family(cut(order[:k]), k=k) for family, order in orders]
        if k < flat.numel():  # with every entry kept, random-k is the same patch
            conditions += [RANDOM_K(cut(torch.randperm(flat.numel(), generator=gen)[:k]), k=k, j=j, draws=draws)
                           for j in range(draws)]
    return conditions


def sparsity_table(metrics: dict[str, Metrics], n: int, draws: int) -> list[SparsityPoint]:
    """Per k, the top-k patch's scores, the contribution-ranked one's, and the mean of the random draws."""
    base, broken = metrics["base"], metrics["broken"]
    table = []
    for k in powers_of_two(n):
        top = scored(metrics[TOP_K.name(k=k)], base, broken)
        runs = [scored(metrics[RANDOM_K.name(k=k, j=j)], base, broken) for j in range(draws)] if k < n else [top]
        values = {key: [getattr(r, key) for r in runs] for key in Scored.model_fields}  # None: no damage
        random = {key: None if None in v else sum(v) / len(v) for key, v in values.items()}
        table.append(SparsityPoint(k=k, **top.model_dump(),
                                   by_contribution=scored(metrics[CONTRIB_K.name(k=k)], base, broken),
                                   random=RandomScored(**random, draws=len(runs) if k < n else 0)))
    return table
