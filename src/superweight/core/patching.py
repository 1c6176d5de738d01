"""A trained row patch on a model: check that it fits, apply it (undoably), or merge it into the weights.

    check_fits(model, patch)                   # PatchMismatchError on another model or shape
    live = apply_patch(model, patch)           # ablates the recorded weights and adds the vectors
    ...; live.remove()                         # the model is intact again, bit for bit
    with patched(model, ablation, rows, vectors): ...   # the `patched` condition, from parts

A patch fits one model: its config stores a fingerprint of the intact down-projections it touches
(`fingerprint`), and applying it to another model (or another shape) is a clear error, not a silent
mis-application. The file format (patch.safetensors + patch_config.json) is io/patchfile.py's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from superweight.core.arch import down_projection, down_projections, family
from superweight.core.coords import WeightCoord, split_row
from superweight.core.intervene import Ablation, Compose, Intervention, RowPatch
from superweight.errors import SuperweightError


class PatchMismatchError(SuperweightError):
    """A patch applied to a model it was not trained for."""


@dataclass
class PatchData:
    """A patch as read from its files (io/patchfile.load_patch): rows, their vectors, the weights it was trained
    with ablated, and its config (fingerprint, model, recipe, ...)."""

    rows: list[tuple[int, int]]
    vectors: list[torch.Tensor]
    ablated: list[WeightCoord]
    config: Any  # schema/runconfig.PatchConfig (fingerprint, model, spec, recipe, ...): io sits above core


def fingerprint(model: nn.Module, layers: list[int]) -> str:
    """SHA-256 of the model's shape and of the named layers' intact down-projection weights (every expert's, in
    a mixture-of-experts layer).

    Weights are hashed after rounding to bf16, so the same checkpoint loaded in fp32 or bf16 matches.
    """
    h = hashlib.sha256()
    cfg = model.config
    h.update(f"{family(model)}|{cfg.num_hidden_layers}|{model.get_output_embeddings().weight.shape}".encode())
    wanted = set(layers)
    for dp in down_projections(model):
        if dp.layer in wanted:
            w = dp.matrix.detach().to("cpu", torch.bfloat16).contiguous()
            h.update(w.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:24]


def patched(model: nn.Module, ablation: Ablation | Iterable[WeightCoord], rows, vectors) -> Intervention:
    """The `patched` condition: the weights ablated (an Ablation that several conditions share, or the
    coordinates to make one), then the row patch `vectors` added on `rows`."""
    ablation = ablation if isinstance(ablation, Ablation) else Ablation(model, ablation)
    return Compose(ablation, RowPatch(model, rows, vectors))


def edit_identity(ablated: Iterable[WeightCoord], rows=(), vectors=()) -> str:
    """The edit a condition makes, as text that names it exactly ("ablate 11:507:1229", then " + patch <digest of
    the rows and the vectors' bytes>"): what measure/metrics.Passes keeps a condition's pass under, so a later
    stage that builds the same edit reads that pass instead of running it again."""
    text = "ablate " + ", ".join(map(str, ablated))
    if not rows:
        return text
    h = hashlib.sha256(repr([tuple(r) for r in rows]).encode())
    for v in vectors:
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"{text} + patch {h.hexdigest()[:24]}"


def check_fits(model: nn.Module, patch: PatchData) -> None:
    """Refuse (PatchMismatchError) a patch whose vectors do not fit this model's d_ff, or whose weights'
    fingerprint differs: it was trained on another model."""
    for r, v in zip(patch.rows, patch.vectors):
        layer, _row, expert = split_row(r)
        dp = down_projection(model, layer, expert)
        if v.shape != (dp.d_ff,):
            raise PatchMismatchError(
                f"patch vector for {dp.where} has {v.numel()} entries but this model's d_ff is {dp.d_ff}"
            )
    layers = [r[0] for r in patch.rows] + [c.layer for c in patch.ablated]
    if fingerprint(model, layers) != patch.config.fingerprint:
        raise PatchMismatchError(
            f"patch was trained on another model ({patch.config.model or '?'}): weight fingerprint differs"
        )


def apply_patch(model: nn.Module, patch: PatchData) -> Intervention:
    """Ablate the recorded weights and add the patch; returns the applied intervention (call .remove())."""
    check_fits(model, patch)
    live = patched(model, patch.ablated, patch.rows, patch.vectors)
    live.apply()
    return live


def merge_into_weights(model: nn.Module, patch: PatchData) -> None:
    """Permanently ablate and add the patch rows into the weights (for export); no undo."""
    check_fits(model, patch)
    Ablation(model, patch.ablated).apply()  # applied and never removed: the export is the ablated model
    for r, v in zip(patch.rows, patch.vectors):
        layer, row, expert = split_row(r)
        dp = down_projection(model, layer, expert)
        dp.set_row(row, dp.row(row) + v.to(dp.weight.dtype))
