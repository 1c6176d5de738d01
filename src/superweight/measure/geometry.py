"""What a patch is, against the weights it repairs: norm, cosines, d[col] vs the deleted value, top entries.

    g = geometry(model, coords, rows, patch.vectors, intact_values(model, coords), inputs={11: x})
    g.norm, g.rows[1].cos_original_row, g.write_rms

Two kinds of numbers. ‖d‖, cos(d, row), cos(d, e_col) and the top |d| entries depend on the parametrization:
rescaling neuron j without changing the model (`core/reparam.rescale_mlp`, d_j -> d_j / a_j) moves them. Their
invariant counterparts do not, so results stay comparable across models and rescalings:
- `balanced_norm`: ‖d‖ in the MLP's balanced parametrization (d_j * n_j, `core/reparam.neuron_balance`);
- `value_ratio`: d[col] / the deleted value;
- with `inputs` (the down-projection's input x [tokens, d_ff] per layer), what the patch writes, x · d:
  `write_rms` (its RMS over those tokens), `write_cos_original_row` (cos(x·d, x·w) over tokens),
  `write_cos_ablated` (cos(x·d, x[col])), and `top_writes` (neurons by the RMS of x_j d_j).

Which symmetry each survives (core/reparam.py has all three): the neuron rescaling moves none of the invariant
ones; scaling the residual stream by c scales `write_rms`, `top_writes` and `balanced_norm` by c (they are sizes
in the residual's units), and `write_vs_removed` = RMS(x·d) / RMS(x[col] · deleted value), what the patch
writes over what the ablation removed, does not move under any of the three, nor do the cosines and
`value_ratio`. Moving a norm's gain changes none of them (x and W stay as they are).
"""

from __future__ import annotations

import torch
from torch import nn

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord, make_row, row_of, site, split_row
from superweight.core.reparam import neuron_balance
from superweight.errors import UnsupportedArchitectureError
from superweight.schema.record import ColGeometry, PatchGeometry, RowGeometry


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.cosine_similarity(a.double(), b.double(), 0).item()


def rms(write: torch.Tensor) -> torch.Tensor:
    """The RMS over tokens of a write (x @ d, or x[col] * a value): the one measure of how much a row writes."""
    return write.pow(2).mean().sqrt()


def neuron_writes(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per neuron j, the RMS over tokens of x_j d_j: how much each entry of d writes (the same neurons however
    the MLP is scaled)."""
    return (x * d).pow(2).mean(0).sqrt()


RESTORES = 0.5  # d[col] / deleted value from which a patch restores the deleted weight


def regime_of(value_ratio: float | None) -> str:
    """restoration: the patch gives back at least half of the deleted value at its column (d[col] / deleted >=
    0.5); compensation: it repairs another way (or patches another row, where there is no such column)."""
    return "restoration" if value_ratio is not None and value_ratio >= RESTORES else "compensation"


def geometry(model: nn.Module, coords: list[WeightCoord], rows, vectors, originals: list[float],
             inputs: dict[int, torch.Tensor] | None = None) -> PatchGeometry:
    """Every patched row's geometry, in the order of `rows`, and the first row's at the top level
    (docs/results.md, `patch`). Call it with the interventions off: "original row" means the intact weights."""
    out = []
    for r, d in zip(rows, vectors):
        layer, row, expert = split_row(r)
        d = d.detach().float().cpu()
        norm = d.norm().item()
        w_row = down_projection(model, layer, expert).row(row).float().cpu()
        x = None if inputs is None or site(r) not in inputs else inputs[site(r)].float().cpu()
        write = None if x is None else x @ d
        cols = [
            ColGeometry(col=c.col, value_at_col=d[c.col].item(), deleted_value=w - w * c.scale,
                        cos_ablated_direction=d[c.col].item() / norm if norm > 0 else 0.0,
                        value_ratio=d[c.col].item() / (w - w * c.scale) if w - w * c.scale else None,
                        write_cos_ablated=None if write is None else _cos(write, x[:, c.col]))
            for c, w in zip(coords, originals) if row_of(c) == make_row(layer, row, expert)
        ]
        top = d.abs().topk(min(16, d.numel())).indices
        invariant = {}
        try:
            if expert is None:  # not defined for an expert (engine/patch.py)
                invariant["balanced_norm"] = (d * neuron_balance(model, layer)).norm().item()
        except UnsupportedArchitectureError:  # GELU MLPs have no function-preserving neuron scale
            pass
        if write is not None:
            per_neuron = neuron_writes(x, d)
            removed = sum((x[:, c.col] * c.deleted_value for c in cols), torch.zeros(x.shape[0]))  # what ablation took
            write_rms, removed_rms = rms(write).item(), rms(removed).item()
            invariant |= {"write_rms": write_rms, "write_vs_removed": write_rms / removed_rms if removed_rms else None,
                          "write_cos_original_row": _cos(write, x @ w_row),
                          "top_writes": [(int(i), per_neuron[i].item())
                                         for i in per_neuron.topk(min(16, d.numel())).indices]}
        out.append(RowGeometry(
            layer=layer, row=row, expert=expert, norm=norm,
            cos_original_row=torch.cosine_similarity(d, w_row, 0).item(),
            **(cols[0].model_dump() if cols else {}), cols=cols, top_entries=[(int(i), d[i].item()) for i in top],
            **invariant,
        ))
    return PatchGeometry(**out[0].model_dump(), rows=out)
