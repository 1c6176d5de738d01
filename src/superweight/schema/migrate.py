"""Reading run records of older versions: lift them to the current schema (schema/record.py), or refuse in one line.

    record = parse(json.loads(text), "runs/x/results.json")     # what io/rundir.RunDir.record does
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from superweight.core.conditions import SCALE
from superweight.errors import SuperweightError
from superweight.engine.config import FLAT_DEFAULTS, upgrade_config
from superweight.schema.record import SCHEMA_VERSION, RunRecord
from superweight.settings import file_error_line

# What to do with a results.json that does not fit the record (hand-edited, or written by another version).
RECORD_FIX = ("undo a hand edit, or rerun the command that wrote it into a new directory; a file from another "
              "superweight version reads with that version")


def migrate(data: Any, where: str = "results.json") -> dict:
    """Lift a results.json of any known version to the current one (a new dict), one version at a time; refuse
    anything else in one line. Version 1 (no schema_version): patch.rows keyed "LAYER:ROW" (or, older still, the
    whole patch keyed by row), and no config.data (the seed recipe read one wikitext line per sequence).
    Version 2: `sweep` held flat points ({scale, nll, ppl, kl, top1_agree, super_activation}), detect.candidates a
    summary of each candidate, seeds.mean / seeds.std no `seed` (the last two have defaults in version 3), and
    `config` an untyped dict, which may lack the settings added since (check_rows, space). Version 3: `config` one
    flat RepairConfig for every optimiser (engine/config.upgrade_config makes it the union's). Version 4: an lbfgs
    config without `done_tol` (the rule came in version 5: it ran without, 0)."""
    if not isinstance(data, dict):
        raise SuperweightError(f"{where} holds no results object")
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise SuperweightError(f"{where} has no valid schema_version ({version!r})")
    if version > SCHEMA_VERSION:
        raise SuperweightError(f"{where} has schema version {version}, newer than this superweight reads "
                               f"({SCHEMA_VERSION}): upgrade superweight")
    if version == 1:
        try:
            data = {**data, "schema_version": 2, "patch": _patch_v1(data.get("patch") or {})}
        except (TypeError, ValueError, AttributeError) as exc:
            raise SuperweightError(f"{where} is not a run record superweight can read (patch: {exc})") from None
        if isinstance(data.get("config"), dict) and "data" not in data["config"]:
            data["config"] = {**data["config"], "data": "lines" if data.get("recipe") == "seed" else "packed"}
        version = 2
    if version == 2:
        data = {**data, "schema_version": 3, "config": _config_v2(data.get("config"))}
        if isinstance(data.get("sweep"), list):
            try:
                data["sweep"] = [_sweep_point_v2(p, data) for p in data["sweep"]]
            except (TypeError, ValueError, AttributeError) as exc:
                raise SuperweightError(f"{where} is not a run record superweight can read (sweep: {exc})") from None
        version = 3
    if version in (3, 4):  # version 4: a union config, whose lbfgs had no `done_tol` rule yet
        data = {**data, "schema_version": 5, "config": upgrade_config(data.get("config"), flat=version == 3)}
    return data


def _sweep_point_v2(p: dict, data: dict) -> dict:
    """{scale, nll, ...} -> {label, scale, metrics}: base at scale 1 (the unscaled model), else scale{s}; the
    point's token count is the analysis's."""
    scale = float(p["scale"])
    n_tokens = ((data.get("analysis") or {}).get("protocol") or {}).get("n_tokens", 0)
    return {"label": "base" if scale == 1.0 else SCALE.name(s=scale), "scale": scale,
            "metrics": {k: v for k, v in p.items() if k != "scale"} | {"n_tokens": n_tokens}}


def _config_v2(config):
    """Version 2's untyped config as version 3's flat RepairConfig: settings that did not exist yet take what the
    run did without them (no held-out check, weight space); keys no longer known are dropped."""
    if not isinstance(config, dict):
        return config
    lifted = {"check_rows": 0, "space": "weight", **config}
    return {k: v for k, v in lifted.items() if k in FLAT_DEFAULTS}


def _patch_v1(p: dict) -> dict:
    if p and "norm" not in p:  # the oldest: {"11:507": {norm, ..., "col1229": {...}}}, one row
        key, old = next(iter(p.items()))
        layer, _, row = str(key).partition(":")
        p = {k: v for k, v in old.items() if not k.startswith("col")} | {"layer": int(layer), "row": int(row)}
        for k, v in old.items():
            if k.startswith("col") and isinstance(v, dict):
                p |= v | {"col": int(k[3:])}
                break
    rows = p.get("rows")
    if isinstance(rows, dict):
        rows = list(rows.values())
    if rows is None and p:
        rows = [{k: v for k, v in p.items() if k != "rows"}]
    return {**p, "rows": rows or []}


def parse(data: Any, where: str = "results.json") -> RunRecord:
    """A RunRecord from results.json's parsed JSON, migrated; a record that does not fit is one error line."""
    try:
        return RunRecord.model_validate(migrate(data, where))
    except ValidationError as exc:
        raise SuperweightError(file_error_line(exc, where, "a run record", RECORD_FIX)) from None
