"""Patch artifacts: `patch.safetensors` (only the vectors) + `patch_config.json` (what they fit).

    save_patch(run_dir, model, row_patch, ablated, meta)   # atomic; the config carries the model's fingerprint
    data = as_patch_data(model, row_patch, ablated, meta)  # the same PatchData in memory; write_patch(dir, data)
    patch = load_patch("runs/x")               # or the .safetensors path: a core.patching.PatchData

A mixture-of-experts row is [layer, row, expert] in the config and `layer{l}.expert{e}.row{r}` in the file.
Applying, checking and merging a loaded patch is core/patching.py's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord, make_row, split_row
from superweight.core.intervene import RowPatch
from superweight.core.patching import PatchData, fingerprint
from superweight.errors import SuperweightError
from superweight.io import files
from superweight.io.provenance import provenance
from superweight.schema.runconfig import PATCH_CONFIG_VERSION, PatchConfig, lift
from superweight.settings import file_error_line

PATCH_FILE = "patch.safetensors"
CONFIG_FILE = "patch_config.json"


def tensor_name(r) -> str:
    layer, row, expert = split_row(r)
    return f"layer{layer}.row{row}" if expert is None else f"layer{layer}.expert{expert}.row{row}"


def _row(entry) -> tuple:
    """A config row ([layer, row] or [layer, row, expert]) as a patch row; ValueError when it is neither."""
    if not isinstance(entry, list) or len(entry) not in (2, 3):
        raise ValueError
    return make_row(*split_row(entry))  # a layer, row or expert that is no number (or "shared"): ValueError


def save_patch(run_dir: Path, model: nn.Module, patch: RowPatch, ablated: list[WeightCoord], meta: dict) -> PatchData:
    """Write the vectors and their config into `run_dir` (`as_patch_data` then `write_patch`); returns what it wrote."""
    data = as_patch_data(model, patch, ablated, meta)
    write_patch(run_dir, data)
    return data


def as_patch_data(model: nn.Module, patch: RowPatch, ablated: list[WeightCoord], meta: dict) -> PatchData:
    """A trained RowPatch as the PatchData its files hold, in memory: the vectors (fp32, CPU) and their config
    (schema/runconfig.PatchConfig); `meta` holds PatchConfig's fields about how it was made (model, spec, recipe, config,
    and `excluded`: per row the columns training held at 0, which later training on the patch, `sparsify`, holds
    there too)."""
    layers = [r[0] for r in patch.rows] + [c.layer for c in ablated]
    dps = {}  # "layer" (or "layer:expert") -> its down-projection
    for r in patch.rows:
        layer, _row, expert = split_row(r)
        dps[str(layer) if expert is None else f"{layer}:{expert}"] = down_projection(model, layer, expert)
    config = PatchConfig(
        **meta,
        fingerprint=fingerprint(model, layers),
        ablated=[str(c) for c in ablated],
        rows=[list(r) for r in patch.rows],
        d_ff={key: dp.d_ff for key, dp in dps.items()},
        d_model=next(iter(dps.values())).d_model,
        provenance=provenance(),
    )
    vectors = [v.detach().cpu().float().contiguous() for v in patch.vectors]
    return PatchData(rows=list(patch.rows), vectors=vectors, ablated=list(ablated), config=config)


def write_patch(run_dir: Path, data: PatchData) -> None:
    """patch.safetensors (atomic) and patch_config.json (sorted, indented JSON) of `data` into `run_dir`."""
    tensors = {tensor_name(r): v.detach().cpu().float().contiguous() for r, v in zip(data.rows, data.vectors)}
    files.write_atomic(run_dir / PATCH_FILE, lambda tmp: save_file(tensors, str(tmp)))
    files.write_json(run_dir / CONFIG_FILE, dict(sorted(data.config.model_dump(exclude_none=True).items())))


PATCH_NEEDS = ("a patch config needs 'rows' ([[layer, row], ...] or [layer, row, expert] in a mixture of experts), "
               "'ablated' (LAYER:ROW:COL coordinates) and 'fingerprint'")


def load_patch(path: str | Path) -> PatchData:
    """Read a patch from a run directory (or its safetensors file). A missing or damaged file, or a config
    without the keys a patch needs, is one error line naming the file."""
    from superweight.core.coords import parse_coord
    from superweight.errors import CoordinateError

    path = Path(path)
    if not path.exists():
        raise SuperweightError(f"no such patch (run directory or {PATCH_FILE}): {path}")
    run_dir = path if path.is_dir() else path.parent
    cfg_path, file_path = run_dir / CONFIG_FILE, run_dir / PATCH_FILE
    if not cfg_path.is_file() or not file_path.is_file():
        raise SuperweightError(f"no patch in {run_dir}: need {PATCH_FILE} and {CONFIG_FILE}")
    raw = lift(files.read_json(cfg_path, "patch config"), PATCH_CONFIG_VERSION)
    if not isinstance(raw, dict):
        raise SuperweightError(f"{cfg_path} holds no patch config object")
    try:
        config = PatchConfig.model_validate(raw)
    except ValidationError as exc:
        raise SuperweightError(file_error_line(exc, str(cfg_path), "a patch config", PATCH_NEEDS)) from None
    try:
        rows = [_row(r) for r in config.rows]
        ablated = [parse_coord(str(c)) for c in config.ablated]
        if not rows:
            raise ValueError
    except (KeyError, TypeError, ValueError, CoordinateError):
        raise SuperweightError(f"{cfg_path} is not a patch config: {PATCH_NEEDS}") from None
    try:
        tensors = load_file(str(file_path))
    except Exception as exc:  # safetensors' own error type, OSError, ...: a damaged file either way
        text = str(exc).strip().splitlines()
        raise SuperweightError(f"{file_path} is damaged ({text[0] if text else type(exc).__name__})") from None
    names = [tensor_name(r) for r in rows]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SuperweightError(f"patch file {file_path} lacks vectors {', '.join(missing)}")
    bad = [n for n in names if tensors[n].dim() != 1 or not torch.isfinite(tensors[n]).all()]
    if bad:
        raise SuperweightError(f"patch file {file_path}: {', '.join(bad)} not a finite vector")
    extra = sorted(set(tensors) - set(names))
    if extra:
        import logging

        logging.getLogger("superweight").warning("superweight: ignoring unknown tensors in patch: %s", extra)
    return PatchData(rows=rows, vectors=[tensors[n] for n in names], ablated=ablated, config=config)
