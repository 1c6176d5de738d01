"""Settings as objects: each checks itself where it is defined (library callers get the CLI's checks), a change
re-validates, the record names the recipe that ran, and the run directory's settings files are typed and versioned."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from superweight.errors import SuperweightError, UsageError
from superweight.io import corpora
from superweight.schema.migrate import migrate
from superweight.io.placement import Placement
from superweight.schema.record import SCHEMA_VERSION
from superweight.schema.runconfig import PatchConfig, RunConfig, parse
from superweight.progress import SILENT, EachStep, Prefixed, Progress
from superweight.settings import build, error_line, revalidated
from superweight.stages.detect import DetectConfig
from superweight.stages.evaluate import EvalConfig
from superweight.stages.pipeline import PipelineJob
from superweight.engine.config import RECIPES, recipe_label, recipe_settings
from superweight.stages.repair import RepairJob, repair_settings


@pytest.mark.parametrize("kwargs, line", [
    ({"calib_tokens": 1}, "--calib-tokens must be at least 2, got 1"),
    ({"max_candidates": 0}, "--max-candidates must be at least 1, got 0"),
    ({"attribution_top": -1}, "--attribution-top must be at least 0, got -1"),
    ({"spike_ratio": 0.0}, "--spike-ratio must be positive, got 0"),
    ({"min_kl": -1.0}, "--min-kl must be at least 0, got -1"),
])
def test_detect_config_checks_itself(kwargs, line):
    with pytest.raises(ValidationError) as exc:
        DetectConfig(**kwargs)
    assert error_line(exc.value, "--") == line
    with pytest.raises(UsageError, match=line.removeprefix("--").split(" ")[0].replace("-", "_")):
        build(DetectConfig, None, "", **kwargs)  # the API's form names the argument


def test_detect_config_attribution_none_and_unknown():
    assert DetectConfig(attribution="none").attribution is None
    with pytest.raises(UsageError, match="unknown attribution 'magic': use activation, gradient or none"):
        DetectConfig(attribution="magic")


def test_placement_checks_itself():
    with pytest.raises(UsageError, match="unknown dtype 'fp8'"):
        Placement(dtype="fp8")
    with pytest.raises(UsageError, match="--max-memory and --offload-folder need --device-map"):
        Placement(max_memory="cpu=1GiB")
    with pytest.raises(UsageError, match="invalid --max-memory device 'gpu0'"):
        Placement(device_map="auto", max_memory="gpu0=1GiB")
    assert Placement(device_map="auto", max_memory="0=1GiB,cpu=2GiB").where() == "device map auto"


def test_repair_job_takes_its_recipe_and_checks_its_values():
    job = RepairJob(recipe="balanced")
    assert job.config == RECIPES["balanced"] and job.label == "balanced"
    with pytest.raises(UsageError, match="unknown recipe 'nope'"):
        RepairJob(recipe="nope")
    for field, value, line in [("eval_tokens", 1, "--eval-tokens must be at least 2, got 1"),
                               ("seeds", 0, "--seeds must be at least 1, got 0"),
                               ("checkpoint_every", 0, "--checkpoint-every must be at least 1, got 0")]:
        with pytest.raises(ValidationError) as exc:
            RepairJob(**{field: value})
        assert error_line(exc.value) == line
    assert PipelineJob().repair.eval_tokens == 2048 and PipelineJob().repair.baselines
    with pytest.raises(ValidationError):
        PipelineJob(draws=0)
    with pytest.raises(UsageError, match="stride must be between 1 and max_length"):
        EvalConfig(max_length=64, stride=65)


def test_a_change_is_validated_again():
    job = RepairJob()
    assert revalidated(job, seeds=3).seeds == 3 and job.seeds == 1  # a new object; the old one is unchanged
    with pytest.raises(ValidationError):
        revalidated(job, seeds=0)  # model_copy(update=...) would have let this through
    with pytest.raises(UsageError, match="max-evals must be at least 1"):
        revalidated(RECIPES["lbfgs"], max_evals=0)
    with pytest.raises(UsageError, match="steps must be at least 1"):
        revalidated(RECIPES["quick"], steps=0)
    with pytest.raises(ValidationError):
        job.seeds = 2  # frozen: a change goes through revalidated


def test_the_recipe_that_ran_is_named():
    assert recipe_label("lbfgs", RECIPES["lbfgs"]) == "lbfgs"
    assert recipe_label("lbfgs", recipe_settings("lbfgs", budget=100)) == "lbfgs+max_evals=100"
    assert recipe_label("balanced", recipe_settings("balanced", seed=3, lr=0.5)) == "balanced+lr=0.5+seed=3"
    assert RepairJob(recipe="lbfgs", config=recipe_settings("lbfgs", max_evals=100)).label == "lbfgs+max_evals=100"
    with pytest.raises(UsageError, match="invalid --optimizer 'lion'"):
        recipe_settings("lbfgs", "--", optimizer="lion")


# A version-3 record's (and config.json v2's, and a checkpoint's) config of the default recipe: one flat model
# for every optimiser, with the first-order fields lbfgs ignored and `steps` counting its loss evaluations.
OLD_LBFGS = {"steps": 64, "batch_size": 4, "seq_len": 128, "lr": 1.0, "weight_decay": 0.0, "optimizer": "lbfgs",
             "schedule": "cosine", "warmup": 0, "kl": "forward", "temperature": 1.0, "init": "zero", "seed": 0,
             "train_tokens": 4096, "teacher_cache_mb": 2048, "space": "column", "check_rows": 2,
             "progress_tol": 0.02, "data": "packed"}


def test_the_settings_are_a_union_whose_default_is_the_product_s():
    from superweight.engine.config import FirstOrderConfig, LbfgsConfig, configure, parse_config, upgrade_config

    assert LbfgsConfig() == RECIPES["lbfgs"] == RepairJob().config and configure() == LbfgsConfig()
    assert parse_config({"optimizer": "sgd", "steps": 5}) == FirstOrderConfig(optimizer="sgd", steps=5)
    with pytest.raises(ValidationError, match="warmup"):
        LbfgsConfig(warmup=5)  # cannot be expressed: lbfgs has no warm-up
    with pytest.raises(ValidationError, match="max_evals"):
        FirstOrderConfig(max_evals=5)
    with pytest.raises(UsageError, match="--warmup applies to the first-order optimizers .* not lbfgs"):
        recipe_settings("lbfgs", "--", warmup=5)
    with pytest.raises(UsageError, match="schedule applies to the first-order optimizers .* not lbfgs"):
        recipe_settings("quick", optimizer="lbfgs", schedule="cosine")
    # across engines the shared settings and the budget carry over, the engine's own start fresh
    sgd = recipe_settings("lbfgs", optimizer="sgd")
    assert (sgd.steps, sgd.space, sgd.batch_size, sgd.schedule) == (64, "column", 4, "cosine")
    back = configure(sgd, optimizer="lbfgs", budget=9)
    assert back == LbfgsConfig(max_evals=9) and back.budget == 9 and sgd.budget == 64
    # the flat config of earlier versions: lbfgs's steps were loss evaluations, its schedule fields ignored
    assert parse_config(upgrade_config(OLD_LBFGS)) == LbfgsConfig(done_tol=0.0)  # no done rule then
    old_sgd = {**{k: v for k, v in OLD_LBFGS.items() if k != "progress_tol"}, "optimizer": "sgd", "lr": 0.1}
    assert parse_config(upgrade_config(old_sgd)) == FirstOrderConfig(optimizer="sgd", steps=64, lr=0.1, space="column",
                                                                      train_tokens=4096)
    assert upgrade_config(LbfgsConfig().model_dump()) == LbfgsConfig().model_dump()  # today's: as it is
    # a flat config that names no optimizer ran the flat default, adamw: no lbfgs setting is added to it
    assert parse_config(upgrade_config({"steps": 5}, flat=True)) == FirstOrderConfig(
        steps=5, lr=0.1, space="weight", train_tokens=16384, check_sequences=2)
    assert parse_config(upgrade_config({"optimizer": "lbfgs"}, flat=True)) == LbfgsConfig(
        max_evals=80, lr=0.1, space="weight", train_tokens=16384, progress_tol=0.0, done_tol=0.0)  # flat defaults


def test_version_3_records_and_old_settings_files_get_the_union():
    raw = {"schema_version": 3, "recipe": "lbfgs", "config": OLD_LBFGS}
    lifted = migrate(raw)
    # the default recipe of that version: no done rule then (done_tol 0)
    assert lifted["schema_version"] == SCHEMA_VERSION == 5
    assert lifted["config"] == RECIPES["lbfgs"].model_dump() | {"done_tol": 0.0}
    v4 = migrate({**raw, "schema_version": 4, "config": {k: v for k, v in RECIPES["lbfgs"].model_dump().items()
                                                          if k != "done_tol"}})
    assert v4["schema_version"] == 5 and v4["config"] == RECIPES["lbfgs"].model_dump() | {"done_tol": 0.0}
    assert migrate({**raw, "schema_version": 4, "config": RECIPES["fast"].model_dump()})["config"] == \
        RECIPES["fast"].model_dump()  # a first-order config: nothing to add
    settings = repair_settings("tiny", RepairJob(), [], [(1, 5)], corpora.Bos("on"))
    old = {**settings.model_dump(mode="json"), "schema_version": 2, "config": OLD_LBFGS}
    lifted = parse(RunConfig, old, "config.json")
    assert lifted.config == settings.config.model_copy(update={"done_tol": 0.0})
    assert lifted.model_copy(update={"config": settings.config}) == settings
    v3 = {**settings.model_dump(mode="json"), "schema_version": 3}
    del v3["config"]["done_tol"]
    assert parse(RunConfig, v3, "config.json").config.done_tol == 0.0


def test_config_json_is_typed_and_old_ones_still_resume():
    job = RepairJob(recipe="quick", seeds=2)
    settings = repair_settings("tiny", job, [], [(1, 5)], corpora.Bos("on"))
    data = settings.model_dump(mode="json")
    assert data["schema_version"] == 4 and data["rows"] == [[1, 5]] and data["bos"] == "on"
    assert parse(RunConfig, json.loads(json.dumps(data)), "config.json") == settings
    old = {k: v for k, v in data.items() if k not in ("schema_version", "bos")}  # before the schema and --bos
    lifted = parse(RunConfig, old, "config.json")
    assert lifted.bos == "auto" and lifted.config == job.config and lifted.schema_version == 4
    with pytest.raises(SuperweightError, match="newer|does not read"):
        parse(RunConfig, {**data, "schema_version": 99}, "config.json")
    with pytest.raises(SuperweightError, match="config.json: eval_tokens: input should be a valid integer.*not run settings superweight can read"):
        parse(RunConfig, {**data, "eval_tokens": "many"}, "config.json")
    patch = parse(PatchConfig, {"fingerprint": "ab", "ablated": ["1:5:7"], "rows": [[1, 5], [1, 9, "shared"]]}, "p")
    assert patch.schema_version == 4 and patch.rows[1] == [1, 9, "shared"] and patch.spec is None


def test_version_2_records_get_a_typed_config():
    raw = {"schema_version": 2, "recipe": "fast", "config": {**RECIPES["fast"].model_dump(), "removed_key": 1}}
    for key in ("check_sequences", "space"):
        del raw["config"][key]
    lifted = migrate(raw)
    assert lifted["schema_version"] == SCHEMA_VERSION == 5
    assert lifted["config"]["check_sequences"] == 0 and lifted["config"]["space"] == "weight"
    assert "removed_key" not in lifted["config"]


def test_one_progress_protocol():
    seen = []
    each = EachStep(lambda step, loss: seen.append((step, loss)))
    prefixed = Prefixed(each, "Detect: ")
    for p in (SILENT, each, prefixed):
        assert isinstance(p, Progress)
        p.stage("x", 3)
    each.advance(2, 0.5)
    prefixed.advance(1)
    assert seen == [(1, 0.5), (2, 0.5), (3, None)]


def test_an_error_in_a_record_names_no_option(capsys):
    """A ValidationError from a settings model names the option; one from a record superweight built itself is a
    bug, said as such, naming the record and field (the issue: `invalid --kl-recovery None`, an option no command
    has); one in a file names the file and the field, and what to do."""
    import typer

    from superweight.cli.common import errors
    from superweight.schema.record import Scored
    from superweight.settings import file_error_line, is_settings_error

    with pytest.raises(ValidationError) as option:
        DetectConfig(calib_tokens=1)
    with pytest.raises(ValidationError) as record:
        Scored(nll=1.0, ppl=2.7, kl=0.0, nll_gap="high", kl_recovery=None)
    assert is_settings_error(option.value) and not is_settings_error(record.value)

    @errors
    def command(exc):
        raise exc

    for exc, code, words in [(option.value, 2, "Error: --calib-tokens must be at least 2"),
                             (record.value, 1, "Error: internal error: superweight made an invalid Scored (nll_gap: input "
                                              "should be a valid number")]:
        with pytest.raises(typer.Exit) as exit_:
            command(exc)
        line = capsys.readouterr().err
        assert exit_.value.exit_code == code and line.startswith(words) and line.count("\n") == 1, line
    assert "--" not in line.split("(")[0] and "please report it" in line
    assert file_error_line(record.value, "runs/x/results.json", "a run record", "rerun it") == (
        "runs/x/results.json: nll_gap: input should be a valid number, unable to parse string as a number, got 'high' "
        "(not a run record superweight can read: rerun it)")
