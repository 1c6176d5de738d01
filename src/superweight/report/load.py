"""Reading a run directory for the report and compare: results.json (older formats flattened), the train log,
and the lookups several sections share."""

from __future__ import annotations

import json
from pathlib import Path

from superweight.errors import SuperweightError


def load_run(run_dir: str | Path) -> tuple[Path, dict]:
    run = Path(run_dir)
    path = run / "results.json"
    if not path.is_file():
        raise SuperweightError(f"no results.json in '{run}': not a run directory (see `superweight repair`)")
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SuperweightError(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(r, dict):
        raise SuperweightError(f"'{path}' holds no results object")
    return run, {**r, "patch": _flat_patch(r.get("patch") or {})}


def _flat_patch(p: dict) -> dict:
    """Older runs keyed the patch by row, {"11:507": {norm, ..., "col1229": {...}}}: flatten that one row."""
    if not p or "norm" in p:
        return p
    key, old = next(iter(p.items()))
    layer, _, row = str(key).partition(":")
    flat = {k: v for k, v in old.items() if not k.startswith("col")} | {"layer": layer, "row": row}
    for k, v in old.items():
        if k.startswith("col") and isinstance(v, dict):
            return flat | v | {"col": k[3:]}
    return flat


def train_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves half a last line; the curve without it is still right
        if isinstance(entry, dict) and "step" in entry and "loss" in entry:
            out.append(entry)
    return out


def weight_of(r: dict) -> str | None:
    if (r.get("detect") or {}).get("weight"):
        return str(r["detect"]["weight"])
    broken = str(((r.get("protocol") or {}).get("interventions") or {}).get("broken", ""))
    if broken.startswith("ablate "):
        return broken.removeprefix("ablate ")
    p = r["patch"]
    return f"{p.get('layer')}:{p.get('row')}:{p['col']}" if "col" in p else None


def conditions(r: dict) -> list[tuple[str, dict, dict]]:
    """(name, metrics, recovery) for base, broken, patched and every baseline present."""
    out = [(n, r[n], (r.get("recovery") or {}) if n == "patched" else {})
           for n in ("base", "broken", "patched") if n in r]
    return out + [(n, m, m.get("recovery") or {}) for n, m in (r.get("baselines") or {}).items()]


def smallest_k(sparsity: list[dict], target: float = 0.9, ranking: str | None = None) -> int | None:
    """The fewest entries whose cut patch recovers `target` of the NLL gap, or None: entries kept by largest |d|
    (the top level of each `sparsity` entry), or by `ranking` ("by_contribution", "random")."""
    for e in sorted(sparsity, key=lambda e: e["k"]):
        scores = (e.get(ranking) or {}) if ranking else e
        if (scores.get("nll_gap") or 0) >= target:
            return e["k"]
    return None
