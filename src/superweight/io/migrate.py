"""Reading run records of older versions: lift them to the current schema (io/record.py), or refuse in one line.

    record = parse(json.loads(text), "runs/x/results.json")     # what io/rundir.read_record does
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from superweight.errors import SuperweightError
from superweight.io.record import SCHEMA_VERSION, RepairConfig, RunRecord


def migrate(data: Any, where: str = "results.json") -> dict:
    """Lift a results.json of any known version to the current one (a new dict); refuse anything else in one
    line. Version 1 (no schema_version): patch.rows keyed "LAYER:ROW" (or, older still, the whole patch keyed
    by row), and no config.data (the seed recipe read one wikitext line per sequence). Version 2: config an
    untyped dict, which may lack the settings added since (check_rows, space)."""
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
            data = {**data, "schema_version": SCHEMA_VERSION, "patch": _patch_v1(data.get("patch") or {})}
        except (TypeError, ValueError, AttributeError) as exc:
            raise SuperweightError(f"{where} is not a run record superweight can read (patch: {exc})") from None
        if isinstance(data.get("config"), dict) and "data" not in data["config"]:
            data["config"] = {**data["config"], "data": "lines" if data.get("recipe") == "seed" else "packed"}
    if version <= 2:
        data = {**data, "schema_version": SCHEMA_VERSION, "config": _config_v2(data.get("config"))}
    return data


def _config_v2(config):
    """Version 2's untyped config as a RepairConfig's fields: settings that did not exist yet take what the run
    did without them (no held-out check, weight coordinates); keys no longer known are dropped."""
    if not isinstance(config, dict):
        return config
    lifted = {"check_rows": 0, "space": "weight", **config}
    return {k: v for k, v in lifted.items() if k in RepairConfig.model_fields}


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
        first = exc.errors()[0]
        at = ".".join(str(x) for x in first["loc"])
        raise SuperweightError(f"{where} is not a run record superweight can read ({at}: {first['msg']}; "
                               f"{exc.error_count()} problem(s))") from None
