"""What a patch is, against the weights it repairs: norm, cosines, d[col] vs the deleted value, top entries.

    g = geometry(model, coords, rows, patch.vectors, intact_values(model, coords))
    g["norm"], g["rows"]["11:507"]["cos_original_row"]
"""

from __future__ import annotations

import torch
from torch import nn

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord


def geometry(model: nn.Module, coords: list[WeightCoord], rows, vectors, originals: list[float]) -> dict:
    """The first patched row's geometry, flat, with every row's under `rows` (docs/results.md, `patch`).

    Call it with the interventions off: "original row" means the intact weights."""
    by_row = {}
    for (layer, row), d in zip(rows, vectors):
        d = d.detach().float().cpu()
        norm = d.norm().item()
        w_row = down_projection(model, layer).row(row).float().cpu()
        cols = [
            {"col": c.col, "value_at_col": d[c.col].item(), "deleted_value": w - w * c.scale,
             "cos_ablated_direction": d[c.col].item() / norm if norm > 0 else 0.0}
            for c, w in zip(coords, originals) if (c.layer, c.row) == (layer, row)
        ]
        top = d.abs().topk(min(16, d.numel())).indices
        by_row[f"{layer}:{row}"] = {
            "layer": layer, "row": row, "norm": norm,
            "cos_original_row": torch.cosine_similarity(d, w_row, 0).item(),
            **(cols[0] if cols else {}), "cols": cols,
            "top_entries": [[int(i), d[i].item()] for i in top],
        }
    first = next(iter(by_row.values()))
    return {**first, "rows": by_row}
