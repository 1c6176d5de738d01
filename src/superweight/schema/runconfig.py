"""The two settings files of a run directory, typed and versioned like the record: `config.json` (RunConfig: what
a repair was started with, and what a resumed one must match) and `patch_config.json` (PatchConfig: what a
patch fits). Both are read through their model, older files lifted to the current version.

    settings = parse(RunConfig, read_json(run_dir / "config.json"), "runs/x/config.json")
    settings.bos                                     # "auto" unless the run was started with another --bos

Version 1 of each is the file from before it had a `schema_version`; version 2 held `config` as one flat
RepairConfig, version 3 as the engine's union (engine/config.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from superweight.errors import SuperweightError
from superweight.schema.base import Record
from superweight.engine.config import RepairConfig, upgrade_config
from superweight.settings import file_error_line

RUN_CONFIG_VERSION = 4
PATCH_CONFIG_VERSION = 4
Row = list[int | str]  # [layer, row] or [layer, row, expert] (an expert number or "shared")


class RunConfig(Record):
    """config.json: the settings a repair was started with; `--resume` must give the same ones."""

    schema_version: int = RUN_CONFIG_VERSION
    model: str = Field(description="the model spec as given")
    recipe: str = Field(description="the recipe named (its options on top are in `config`)")
    config: RepairConfig
    ablate: list[str] = Field(description="the ablated weights, LAYER:ROW:COL[@SCALE]")
    rows: list[Row] = Field(description="the patched rows")
    corpus: str
    eval_tokens: int
    max_length: int
    baselines: bool
    checkpoint_every: int
    seeds: int = 1
    bos: str = Field("auto", description="--bos as given")
    exclude: list[str] = Field(default_factory=list, description="--exclude as given (deleted, top:K, columns)")


class PatchConfig(Record):
    """patch_config.json: what the vectors in patch.safetensors fit (the fingerprint of the intact weights they
    were trained on), and how they were made."""

    schema_version: int = PATCH_CONFIG_VERSION
    fingerprint: str = Field(description="hash of the intact down-projections the patch touches")
    ablated: list[str] = Field(description="the ablated weights, LAYER:ROW:COL[@SCALE]")
    rows: list[Row]
    d_ff: dict[str, int] = Field(default_factory=dict, description="layer (or layer:expert) -> its d_ff")
    d_model: int | None = None
    model: str | None = Field(None, description="the model's id (io.models.model_id)")
    spec: str | None = Field(None, description="the model spec as given (apply and analyze load it by default)")
    recipe: str | None = Field(None, description="the recipe that ran, as the record names it")
    config: RepairConfig | None = None
    excluded: list[list[int]] | None = Field(None, description="per row, the columns held at 0 in training")
    provenance: dict[str, str | None] = Field(default_factory=dict)


def lift(data: Any, version: int) -> Any:
    """A settings file's parsed JSON at the current version (version 1 had no schema_version)."""
    if isinstance(data, dict) and "schema_version" not in data:
        data = {**data, "schema_version": 2}
        if isinstance(data.get("config"), dict):
            # before `data`: the seed recipe read one wikitext line per sequence, every other recipe packed them
            data["config"] = {"data": "lines" if data.get("recipe") == "seed" else "packed", **data["config"]}
    if isinstance(data, dict) and data["schema_version"] in (2, 3) and version >= 4:  # 3: lbfgs had no done_tol
        data = {**data, "schema_version": 4,
                "config": upgrade_config(data.get("config"), flat=data["schema_version"] == 2)}
    return data


def parse(cls: type[RunConfig] | type[PatchConfig], data: Any, where: str):
    """A RunConfig or PatchConfig from a file's parsed JSON (lifted to the current version); one error line
    naming `where` when it is none."""
    version = cls.model_fields["schema_version"].default
    what = "run settings" if cls is RunConfig else "patch config"
    data = lift(data, version)
    if not isinstance(data, dict):
        raise SuperweightError(f"{where} holds no {what} object")
    if not isinstance(data["schema_version"], int) or data["schema_version"] > version:
        raise SuperweightError(f"{where} has schema version {data['schema_version']!r}, which this superweight "
                               f"does not read (it reads up to {version}): upgrade superweight")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SuperweightError(file_error_line(exc, where, "run settings" if cls is RunConfig else "a patch config",
                                               "fix that field, or rerun the command that wrote the file "
                                               "into a new directory")) from None
