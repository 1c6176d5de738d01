"""What a patch is, against the weights it repairs: norm, cosines, d[col] vs the deleted value, top entries.

    g = geometry(model, coords, rows, patch.vectors, intact_values(model, coords))
    g.norm, g.rows[1].cos_original_row
"""

from __future__ import annotations

import torch
from torch import nn

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord
from superweight.io.record import ColGeometry, PatchGeometry, RowGeometry


def geometry(model: nn.Module, coords: list[WeightCoord], rows, vectors, originals: list[float]) -> PatchGeometry:
    """Every patched row's geometry, in the order of `rows`, and the first row's at the top level
    (docs/results.md, `patch`). Call it with the interventions off: "original row" means the intact weights."""
    out = []
    for (layer, row), d in zip(rows, vectors):
        d = d.detach().float().cpu()
        norm = d.norm().item()
        w_row = down_projection(model, layer).row(row).float().cpu()
        cols = [
            ColGeometry(col=c.col, value_at_col=d[c.col].item(), deleted_value=w - w * c.scale,
                        cos_ablated_direction=d[c.col].item() / norm if norm > 0 else 0.0)
            for c, w in zip(coords, originals) if (c.layer, c.row) == (layer, row)
        ]
        top = d.abs().topk(min(16, d.numel())).indices
        out.append(RowGeometry(
            layer=layer, row=row, norm=norm, cos_original_row=torch.cosine_similarity(d, w_row, 0).item(),
            **(cols[0].model_dump() if cols else {}), cols=cols, top_entries=[(int(i), d[i].item()) for i in top],
        ))
    return PatchGeometry(**out[0].model_dump(), rows=out)
