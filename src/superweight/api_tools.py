"""The rest of the top-level API (api.py re-exports it): a repair's result with the patch you hold, the model a
command loads once its inputs are checked (`Later`), and one function for each command api.py does not hold (info,
sweep, census, apply, quantize), each the library call its command makes (cli/*.py). The commands on a run
directory are in api_runs.py.

    import superweight as sw
    m = sw.load()
    sw.info(m)                                             # Info: architecture, source, published super weights
    sw.sweep(m, "11:507:1229", scales=[1, 0, -1])          # SweepResult
    fixed = sw.repair(m, "11:507:1229")                    # RepairResult: .record, .patch (nothing written)
    with fixed.patch.apply(): ...                          # the ablated model, repaired; intact again after
    sw.apply(m, fixed.patch, peft="adapter/")              # or fixed.patch.to_peft("adapter/"), .export(dir)
    sw.census(["smollm2-135m", "gemma3-270m"], out="runs/census")

Every function that takes a model takes a `Loaded` (from load()) or a `Later`: the model to load once the
function has checked everything that can fail without it (the CLI's way in, so a bad option never waits for a load).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from superweight.core.coords import as_coords
from superweight.core.patching import PatchData
from superweight.errors import UsageError
from superweight.io.corpora import Bos
from superweight.io.files import check_writable, write_json  # noqa: F401 (the CLI's --json output)
from superweight.io.models import DEFAULT_MODEL, Loaded
from superweight.io.patch import Patch, check_targets, export_model
from superweight.io.placement import Placement
from superweight.schema.quantize import QuantResult
from superweight.schema.record import RunRecord
from superweight.known import Info, model_info
from superweight.settings import build
from superweight.stages.census import CENSUS_CSV, CENSUS_MD, CensusOutcome  # noqa: F401 (the census's tables)
from superweight.stages.census import LOCK_WAIT_S as CENSUS_LOCK_WAIT_S  # noqa: F401
from superweight.stages.quantize import QuantizeConfig, run_quantize
from superweight.stages.sweep import SweepConfig, SweepResult


@dataclass
class Later:
    """A model to load once a function has checked its inputs: `spec` (None: the run's or the patch's own, else
    the default model), where (`where`, a Placement) and with which text protocol (`bos`; None: auto, or the run's
    own for a command that continues a run). `load(spec, where, bos)` loads it (None: io/models.load; the CLI's
    shows a status line), and `note(line)` hears what a person watching should know (the CLI prints it)."""

    spec: str | None = None
    where: Placement = field(default_factory=Placement)
    bos: Bos | None = None
    load: Callable[[str, Placement, Bos], Loaded] | None = None
    note: Callable[[str], None] | None = None

    def __call__(self, spec: str | None = None, bos: Bos | None = None) -> Loaded:
        return (self.load or load_at)(self.spec or spec or DEFAULT_MODEL, self.where, self.bos or bos or Bos())


def load_at(spec: str, where: Placement, bos: Bos) -> Loaded:
    """load() with its placement as one Placement (what a Later calls by default; the CLI's wraps it)."""
    from superweight.io import models

    return models.load(spec, where, bos)


def main_process() -> bool:
    """Whether this is the process that writes and reports (process 0 under `accelerate launch`; always in one)."""
    from superweight.stages.distributed import current

    return current().is_main


def held(m: Loaded | Later, spec: str | None = None, bos: Bos | None = None) -> Loaded:
    """The model: `m` itself, or `m` loaded now (`spec`, `bos`: the run's own, used where `m` names none)."""
    return m if isinstance(m, Loaded) else m(spec, bos)


def spec_of(m: Loaded | Later) -> str:
    """The model spec `m` is, or will be, loaded from."""
    return m.spec or DEFAULT_MODEL


def note(m: Loaded | Later, line: str) -> None:
    """Tell the person watching `m`'s call (a Later's `note`), if anyone."""
    if isinstance(m, Later) and m.note is not None:
        m.note(line)


def placement(device: str = "cpu", dtype: str = "auto", device_map: str | None = None, max_memory: str | None = None,
              offload_folder: str | None = None, prefix: str = "") -> Placement:
    """The placement options of load() (and of every command that loads a model) as one checked Placement; under
    `accelerate launch`, `device` is each process's own GPU. `prefix` names a bad value ("--" for options)."""
    from superweight.stages.distributed import process_device

    return build(Placement, None, prefix, device=process_device(device), dtype=dtype, device_map=device_map,
                 max_memory=max_memory, offload_folder=offload_folder)


@dataclass
class RepairResult:
    """What repair() returns: the run's `record` (the RunRecord, shown as its report), the trained `patch` (a Patch on
    the model it was trained on: apply, save, merge, export, to_peft), the `run_dir` it was written to (None: none
    was), and `unchanged` (a finished run given resume=True: returned as it was, nothing changed)."""

    record: RunRecord
    patch: Patch
    run_dir: Path | None = None
    unchanged: bool = False

    def _repr_html_(self) -> str:
        return self.record._repr_html_()

    def __repr__(self) -> str:
        line = repr(self.record)  # RunRecord(...): the same line, named for what it is
        return f"RepairResult({line[line.index('(') + 1:-1] if line.endswith(')') else line})"


def load_patch(path: str | Path, loaded: Loaded | None = None) -> Patch:
    """The patch a repair wrote (`superweight apply --patch`'s input): a Patch (rows, vectors, ablated, config) held
    with `loaded` (None: give the model to each method, e.g. patch.apply(m)).

    Args:
        path: a run directory written by repair() or run(), or its patch.safetensors.
        loaded=None: the model the patch was trained on, from load().
    """
    from superweight.io.patchfile import load_patch as read_patch

    return Patch.of(read_patch(path), loaded)


def patch_data(patch) -> PatchData | None:
    """A patch given as a Patch / PatchData, a run directory, or None."""
    return None if patch is None else patch if isinstance(patch, PatchData) else load_patch(patch)


def info(loaded: Loaded | Later) -> Info:
    """Architecture, sizes and down-projection names of a model (`superweight info`).

    Args:
        loaded: the model, from load() (or a Later).

    Returns an Info: .arch (family, layers, d_model, d_ff, experts, parameters, down-projection names), .source,
    .published (the model's published super weights); .as_json() is the command's --json.
    """
    return model_info(held(loaded))


def sweep(loaded: Loaded | Later, weight, config: SweepConfig | None = None, progress=None, **overrides) -> SweepResult:
    """Scale one weight through a list of factors and spread it (`superweight sweep`): NLL, PPL, KL and top-1 per
    factor on the same tokens, and generations.

    Args:
        loaded: the model, from load() (or a Later).
        weight: "L:R:C" (without @SCALE) or a WeightCoord.
        config=None: a SweepConfig (stages/sweep.py); None for its defaults (the command's).
        progress=None: a superweight.progress.Progress that hears of each stage (None: silent).
        **overrides: SweepConfig fields that replace the config's:
            scales=[1.0, 0.5, 0.0, -1.0, 2.0]: factors the weight is scaled by.
            spread=8: also zero it and add value/N to the next N columns (None or 0: skip).
            corpus='pydoc', split='eval', max_tokens=4096, max_length=512, prompts=None, max_new_tokens=20.

    Returns a SweepResult: .base, .points (one per factor), .generations; report.plots.save_sweep_plot draws it.
    """
    from superweight.io import corpora
    from superweight.stages.sweep import run_sweep

    (coord,) = as_coords(weight)
    if coord.scale != 0.0 or (isinstance(weight, str) and "@" in weight):
        raise UsageError("weight takes L:R:C without @SCALE; give the factors as scales")
    cfg = build(SweepConfig, config, "", **overrides)
    text = corpora.load_text(cfg.corpus, cfg.split)  # a missing corpus fails before the model loads
    loaded = held(loaded)
    ids = corpora.tokenize(loaded.tokenizer, text, cfg.max_tokens)
    return run_sweep(loaded, coord, cfg, ids=ids, progress=progress)


def new_run_dir(spec: str) -> str:
    """Where `superweight run` writes unless told: runs/MODEL-DATE-TIME (MODEL: the spec's last part, no .gguf)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"runs/{Path(spec).name.removesuffix('.gguf')}-{stamp}"


def sweep_plot_path(coord) -> str:
    """Where `superweight sweep` draws its plot unless told: runs/sweep/11-507-1229.png (3-17-507-1229 in an expert)."""
    return f"runs/sweep/{'-'.join(map(str, coord.key))}.png"


def apply(loaded: Loaded | Later, patch, export: str | Path | None = None, peft: str | Path | None = None,
          ablation_only: bool = False) -> dict:
    """Write a patch out (`superweight apply`): merged into the ablated model as a standalone model directory, and/or
    as a PEFT LoRA adapter for the intact model. The model held is left intact.

    Args:
        loaded: the intact model the patch was trained on, from load() (a Later with no spec: the patch's own).
        patch: a Patch (repair(...).patch, load_patch(...)) or a run directory.
        export=None: a new directory for the merged model (save_pretrained layout).
        peft=None: a new directory for the LoRA adapter (adapter_config.json + adapter_model.safetensors).
        ablation_only=False: with peft, the adapter that only ablates (breaks the model).

    Returns {"export": the directory or None, "peft": the adapter's config or None, "patch": the PatchData,
    "model": the Loaded}.
    """
    from superweight.io.peft import write_peft

    check_targets(export, peft, ablation_only)
    data = patch_data(patch)
    loaded = held(loaded, data.config.spec)
    config = write_peft(loaded, data, Path(peft), ablation_only) if peft else None  # first: on the intact weights
    return {"export": export_model(loaded, data, Path(export)) if export else None, "peft": config, "patch": data,
            "model": loaded}


def census(specs: list[str], out: str | Path | None = None, config=None, model: Later | None = None,
           progress=None, **overrides) -> CensusOutcome:
    """Detect super weights in several models, one at a time, into one table (`superweight census`); a model done in
    an earlier run on `out` is skipped, so a killed census continues.

    Args:
        specs: model specs, as load() takes them.
        out=None: the census directory (None: runs/census-DATE); a census made with other settings is refused.
        config=None: a DetectConfig for every model; None for its defaults.
        model=None: how to load each model (a Later without a spec: its placement, bos, load and note); None:
            load()'s defaults (dtype auto, bos auto, on the CPU).
        progress=None: a Progress for each model's detection (its stages are prefixed with the model's spec).
        **overrides: DetectConfig fields that replace the config's (see detect()).

    Returns a CensusOutcome: .rows (one CensusRow per model), .skipped, .failed, .out; census.csv and census.md in out.
    """
    from superweight.io import corpora
    from superweight.progress import Prefixed, or_silent
    from superweight.report.census import tables
    from superweight.stages import census as stage
    from superweight.stages.detect import DetectConfig, run_detect

    cfg = build(DetectConfig, config, "", **overrides)
    specs = stage.unique(list(specs))
    if not specs:
        raise UsageError("no models given")
    model = model or Later()
    bos = model.bos or Bos()
    if not model.where.device_map:
        from superweight.io.models import resolve_device

        resolve_device(model.where.device)
    path = Path(out or f"runs/census-{_dt.date.today().isoformat()}")
    settings = stage.census_settings(cfg, model.where.dtype, bos)
    stage.check_census_dir(path, settings)
    text = corpora.load_text(cfg.corpus, cfg.split)
    stage.start(path, settings)

    def detect(loaded):
        ids = corpora.tokenize(loaded.tokenizer, text, cfg.calib_tokens)
        return run_detect(loaded, cfg, ids=ids, progress=Prefixed(or_silent(progress), f"{loaded.spec}: "))

    def tell(event: str, _spec: str, line: str) -> None:
        note(model, f"Error: {line}" if event == "error" else line)

    outcome = stage.run_census(specs, path, settings,
                               stage.CensusHooks(lambda spec: model(spec, bos), detect, tables, tell))
    return outcome.model_copy(update={"out": path})


def census_table(out: str | Path, specs: list[str] = ()) -> CensusOutcome:
    """Rewrite a census directory's tables from the results in it, detecting nothing (`superweight census
    --table-only`: the merge after a job array); `specs`, if given, come first and in that order."""
    from superweight.report.census import tables
    from superweight.stages import census as stage

    path = Path(out)
    return CensusOutcome(rows=stage.table_only(path, stage.unique(list(specs)), tables), out=path)


def read_models_file(path: str | Path) -> list[str]:
    """The model specs of a file, one a line (blank lines and # comments skipped): `census --models-file`."""
    from superweight.stages.census import read_models_file as read

    return read(path)


def quantize(loaded: Loaded | Later, bits=None, blocks=None, clip: str | None = None, keep="auto",
             patch: str | Path | None = None, config: QuantizeConfig | None = None, progress=None,
             **overrides) -> QuantResult:
    """Round-to-nearest fake quantization of every decoder linear (`superweight quantize`), plain and with the
    super weights held out of their block, clipped, and clipped then restored; every weight restored after.
    Load the model with dtype="fp32" (the command's default): in bf16 each dequantized value is rounded again.

    Args:
        loaded: the model, from load() (or a Later: loaded once the settings, the block sizes (from the model's
            config, where it is at hand) and the corpus are checked).
        bits=None: weight bits, each 2-8 (a list, or "3,4"); None: the config's (its default: 4).
        blocks=None: block sizes: integers, "channel" or "tensor" (a list, or "64,channel"); None: the config's
            (its default: 64, 128, 256, channel).
        clip=None: none, tensor:P, block:P (the fraction clipped), zscore:Z or iqr:K; None: the config's (its
            default: tensor:1e-4).
        keep='auto': the super weights to protect: auto (published, else the ones detect confirms), none, or
            "L:R:C" / WeightCoord / a list of them.
        patch=None: a repair's Patch or run directory: the repaired model too.
        config=None: a QuantizeConfig (stages/quantize.py) for the settings below; None for its defaults.
        progress=None: a superweight.progress.Progress that hears of each stage (None: silent).
        **overrides: QuantizeConfig fields that replace the config's:
            levels='int': int (min-max RTN) or nf (NormalFloat NF3/NF4).
            protect=(): with clip, also conditions that restore the K clipped weights that change their layer's
                output most, for each K given.
            activations=None: also quantize activations per tensor: int8 (down-projection inputs) or int8:all.
            corpus='pydoc': pydoc, wikitext2 or text:PATH.
            split='eval': the split to score.
            max_tokens=2048: tokens of the corpus to score.
            max_length=512: window length in tokens.
            tasks=None: lm-evaluation-harness tasks per condition ("arc_easy,piqa" or a list).
            include_path=None: with tasks, a folder of local task YAML files.
            task_limit=None: with tasks, score at most this many items per task.

    Returns a QuantResult: .rows (one per condition: PPL, KL, recovery vs RTN, bits per weight), .activations.
    """
    from superweight.core.quant import check_blocks, parse_bits, parse_blocks, parse_clip
    from superweight.io import corpora
    from superweight.progress import or_silent
    from superweight.stages.quantize import auto_keep, parse_activations, shapes_before_load

    join = lambda v: v if isinstance(v, str) else ",".join(map(str, v))  # noqa: E731
    given = {}  # the arguments given: each replaces the config's
    if bits is not None:
        given["bits"] = parse_bits(join(bits))
    if blocks is not None:
        given["blocks"] = parse_blocks(join(blocks))
    if clip is not None:
        given["clip"] = parse_clip(clip)  # "none": None
    if "protect" in overrides:
        overrides["protect"] = sorted(set(overrides["protect"]))
    if isinstance(overrides.get("activations"), str):
        overrides["activations"] = parse_activations(overrides["activations"])
    cfg = build(QuantizeConfig, config, "", **given, **with_tasks(overrides))
    if cfg.protect and (cfg.clip is None or min(cfg.protect) < 1):
        raise UsageError("protect restores clipped weights: give counts of at least 1 and a clip method")
    coords, source = (None, "auto") if keep == "auto" else ([], "none") if keep == "none" else (as_coords(keep), "given")
    data = patch_data(patch)
    if not isinstance(loaded, Loaded) and (shapes := shapes_before_load(spec_of(loaded))):
        check_blocks(cfg.blocks, shapes)  # before the weights load, where the model's config is at hand
    text = corpora.load_text(cfg.corpus, cfg.split)  # a missing corpus fails before the model loads
    loaded = held(loaded)
    if coords is None:
        or_silent(progress).stage("Finding the super weights to keep: published, else detected...", None)
        coords, source = auto_keep(loaded, loaded.spec)
    cfg = build(QuantizeConfig, cfg, "", keep=coords, keep_source=source)
    ids = corpora.tokenize(loaded.tokenizer, text, cfg.max_tokens)
    return run_quantize(loaded, cfg, ids=ids, patch=data, progress=progress)


# ---------------------------------------------------------------- helpers
TASK_ARGS = ("tasks", "include_path", "task_limit")


def with_tasks(overrides: dict) -> dict:
    """`overrides` with tasks, include_path and task_limit turned into one checked TaskSpec (or None)."""
    given = {k: overrides.pop(k) for k in TASK_ARGS if k in overrides}
    if not given:
        return overrides
    return {**overrides, "tasks": task_spec(given.get("tasks"), given.get("include_path"), given.get("task_limit"))}


def task_spec(tasks, include_path, limit):
    if tasks is None:
        if include_path is not None or limit is not None:
            raise UsageError("include_path and task_limit go with tasks")
        return None
    from superweight.measure.tasks import prepare_tasks

    return prepare_tasks(tasks, include_path, limit)
