"""The rest of the top-level API (api.py re-exports it): a repair's result with the patch you hold, and one function
for each command api.py does not hold (info, sweep, sparsify, census, apply), each the library call its command
makes (cli/*.py).

    import superweight as sw
    m = sw.load()
    sw.info(m)                                             # Info: architecture, source, published super weights
    sw.sweep(m, "11:507:1229", scales=[1, 0, -1])          # SweepResult
    fixed = sw.repair(m, "11:507:1229", out="runs/mine")   # RepairResult: .record, .patch
    with fixed.patch.apply(): ...                          # the ablated model, repaired; intact again after
    sw.apply(m, fixed.patch, peft="adapter/")              # or fixed.patch.to_peft("adapter/"), .export(dir)
    sw.sparsify(m, "runs/mine", strengths={"l1": (0.8,)})  # RunRecord with .sparse_training
    sw.census(["smollm2-135m", "gemma3-270m"], out="runs/census")
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from superweight.core.coords import as_coords
from superweight.core.patching import PatchData
from superweight.errors import UsageError
from superweight.io.comprecord import Compensation
from superweight.io.corpora import Bos
from superweight.io.lock import hold_run_dir
from superweight.io.models import Loaded
from superweight.io.patch import Patch, check_targets, export_model
from superweight.io.placement import Placement
from superweight.io.record import RunRecord
from superweight.io.rundir import read_record
from superweight.known import Info, model_info
from superweight.settings import build
from superweight.stages.census import CensusOutcome
from superweight.stages.sparsify import SparsifyConfig
from superweight.stages.sweep import SweepConfig, SweepResult


@dataclass
class RepairResult:
    """What repair() returns: the run's `record` (the RunRecord of results.json, shown as its report), the trained
    `patch` (a Patch on the model it was trained on: apply, save, merge, export, to_peft) and the `run_dir`."""

    record: RunRecord
    patch: Patch
    run_dir: Path

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


def info(loaded: Loaded) -> Info:
    """Architecture, sizes and down-projection names of a model (`superweight info`).

    Args:
        loaded: the model, from load().

    Returns an Info: .arch (family, layers, d_model, d_ff, experts, parameters, down-projection names), .source,
    .published (the model's published super weights); .as_json() is the command's --json.
    """
    return model_info(loaded)


def sweep(loaded: Loaded, weight, config: SweepConfig | None = None, **overrides) -> SweepResult:
    """Scale one weight through a list of factors and spread it (`superweight sweep`): NLL, PPL, KL and top-1 per
    factor on the same tokens, and generations.

    Args:
        loaded: the model, from load().
        weight: "L:R:C" (without @SCALE) or a WeightCoord.
        config=None: a SweepConfig (stages/sweep.py); None for its defaults (the command's).
        **overrides: SweepConfig fields that replace the config's:
            scales=[1.0, 0.5, 0.0, -1.0, 2.0]: factors the weight is scaled by.
            spread=8: also zero it and add value/N to the next N columns (None or 0: skip).
            corpus='pydoc', split='eval', max_tokens=4096, max_length=512, prompts=None, max_new_tokens=20.

    Returns a SweepResult: .base, .points (one per factor), .generations; report.plots.save_sweep_plot draws it.
    """
    from superweight.stages.sweep import run_sweep

    (coord,) = as_coords(weight)
    if coord.scale != 0.0:
        raise UsageError("weight takes L:R:C without @SCALE; give the factors as scales")
    return run_sweep(loaded, coord, build(SweepConfig, config, "", **overrides))


def sparsify(loaded: Loaded, run_dir: str | Path, config: SparsifyConfig | None = None, **overrides) -> RunRecord:
    """Train sparse patches (L1, hard-concrete L0) from a repair's patch over a sweep of strengths
    (`superweight sparsify`): the recovery-vs-size frontier, written into the run directory.

    Args:
        loaded: the model the run was made on, from load().
        run_dir: a run directory written by repair() or run().
        config=None: a SparsifyConfig (stages/sparsify.py); None for its defaults (the command's).
        **overrides: SparsifyConfig fields that replace the config's:
            strengths={'l1': (0.6, 0.8, 1.0), 'l0': (1.0, 10.0, 30.0)}: method -> penalty strengths.
            steps=None: steps per sparse patch (None: half the run's).
            tokens=2048: eval-split tokens to score each patch on.
            max_length=512: window length in tokens.

    Returns the updated RunRecord (.sparse_training), also written to run_dir/results.json.
    """
    from superweight.stages.sparsify import run_sparsify

    cfg = build(SparsifyConfig, config, "", **overrides)
    path = Path(run_dir)
    read_record(path)  # a directory that holds no run is refused before it is locked
    with hold_run_dir(path, "sparsify"):
        return run_sparsify(loaded, path, cfg)


def compensate(loaded: Loaded, run_dir: str | Path, max_k: int = 64, stop_below: float = 0.1,
               tokens: int = 1024) -> Compensation:
    """The compensation frontier (`superweight compensate`): the run repaired again with the top 1, 2, 4, ...
    writing neurons held at 0 (greedy), until the held-out KL recovery is below `stop_below` or `max_k` neurons
    are out, scored on `tokens` eval tokens. Returns the Compensation (the record's .compensation)."""
    from superweight.stages.compensate import CompensateConfig, run_compensate

    path, cfg = Path(run_dir), build(CompensateConfig, None, "", max_k=max_k, stop_below=stop_below, tokens=tokens)
    read_record(path)  # a directory that holds no run is refused before it is locked
    with hold_run_dir(path, "compensate"):
        return run_compensate(loaded, path, cfg).compensation


def apply(loaded: Loaded, patch, export: str | Path | None = None, peft: str | Path | None = None,
          ablation_only: bool = False) -> dict:
    """Write a patch out (`superweight apply`): merged into the ablated model as a standalone model directory, and/or
    as a PEFT LoRA adapter for the intact model. The model held is left intact.

    Args:
        loaded: the intact model the patch was trained on, from load().
        patch: a Patch (repair(...).patch, load_patch(...)) or a run directory.
        export=None: a new directory for the merged model (save_pretrained layout).
        peft=None: a new directory for the LoRA adapter (adapter_config.json + adapter_model.safetensors).
        ablation_only=False: with peft, the adapter that only ablates (breaks the model).

    Returns {"export": the directory or None, "peft": the adapter's config or None}.
    """
    from superweight.io.peft import write_peft

    check_targets(export, peft, ablation_only)
    data = patch_data(patch)
    config = write_peft(loaded, data, Path(peft), ablation_only) if peft else None  # first: on the intact weights
    return {"export": export_model(loaded, data, Path(export)) if export else None, "peft": config}


def census(specs: list[str], out: str | Path | None = None, config=None, device: str = "cpu", dtype: str = "auto",
           bos: str = "auto", **overrides) -> CensusOutcome:
    """Detect super weights in several models, one at a time, into one table (`superweight census`); a model done in
    an earlier run on `out` is skipped, so a killed census continues.

    Args:
        specs: model specs, as load() takes them.
        out=None: the census directory (None: runs/census-DATE); a census made with other settings is refused.
        config=None: a DetectConfig for every model; None for its defaults.
        device='cpu': cpu, cuda, cuda:N, mps or auto.
        dtype='auto': as load()'s.
        bos='auto': as load()'s.
        **overrides: DetectConfig fields that replace the config's (see detect()).

    Returns a CensusOutcome: .rows (one CensusRow per model), .skipped, .failed; census.csv and census.md in out.
    """
    from superweight.io import corpora, models
    from superweight.report.census import tables
    from superweight.stages import census as stage
    from superweight.stages.detect import DetectConfig, run_detect

    cfg = build(DetectConfig, config, "", **overrides)
    specs = stage.unique(list(specs))
    if not specs:
        raise UsageError("no models given")
    where = build(Placement, None, "", device=device, dtype=dtype)
    bos = Bos(bos)
    path = Path(out or f"runs/census-{_dt.date.today().isoformat()}")
    settings = stage.census_settings(cfg, dtype, bos)
    stage.check_census_dir(path, settings)
    text = corpora.load_text(cfg.corpus, cfg.split)
    stage.start(path, settings)

    def detect(loaded):
        return run_detect(loaded, cfg, ids=corpora.tokenize(loaded.tokenizer, text, cfg.calib_tokens))

    return stage.run_census(specs, path, settings,
                            stage.CensusHooks(lambda spec: models.load(spec, where, bos), detect, tables))
