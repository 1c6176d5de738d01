"""`info`, `eval`, `detect` and `sweep`: look at a model, and at what one weight does."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from superweight.cli.common import (
    BosOpt, DeviceMapOpt, MaxMemoryOpt, OffloadOpt, check_bos, check_detect_options,
    CorpusOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, SplitOpt, app, err, errors, load_model, out, progress,
    token_and_prompt_tasks, write_result, IncludePathOpt, TaskLimitOpt, TasksOpt, task_spec,
)
from superweight.errors import UsageError
from superweight.io import corpora
from superweight.io.models import DEFAULT_MODEL
from superweight.report import terminal


@app.command()
@errors
def info(model: ModelOpt = DEFAULT_MODEL, device: DeviceOpt = "cpu", dtype: DtypeOpt = "auto",
         json_: JsonOpt = None, device_map: DeviceMapOpt = None, max_memory: MaxMemoryOpt = None,
         offload_folder: OffloadOpt = None, bos: BosOpt = "auto"):
    """Architecture, sizes and down-projection names of a model."""
    from dataclasses import asdict

    from superweight.core.arch import describe
    from superweight.io.files import check_writable, write_json
    from superweight.known import published

    check_bos(bos)
    if json_:
        check_writable(json_)
    loaded = load_model(model, device, dtype, device_map, max_memory, offload_folder, bos)
    desc = describe(loaded.model)
    known = published(model)
    terminal.print_info(out, model, loaded.source, desc, known)
    if json_:
        write_json(json_, {**asdict(desc), "source": loaded.source, "published": [c.model_dump() for c in known]})


@app.command("eval")
@errors
def eval_(
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = corpora.DEFAULT_CORPUS,
    split: SplitOpt = "eval",
    ablate: Annotated[Optional[list[str]], typer.Option(
        help="LAYER:ROW:COL[@SCALE] (repeatable); default: the model's published super weights")] = None,
    max_tokens: Annotated[int, typer.Option(help="tokens of the corpus to evaluate")] = 4096,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    stride: Annotated[Optional[int], typer.Option(help="window stride (default: max-length, no overlap)")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(help="generation prompt (repeatable); default: ten built-in")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens per generation")] = 20,
    patch: Annotated[Optional[str], typer.Option(
        help="run directory of a repair: also the patched model (and its ablation instead of --ablate)")] = None,
    tasks: TasksOpt = None,
    include_path: IncludePathOpt = None,
    task_limit: TaskLimitOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    bos: BosOpt = "auto",
    json_: JsonOpt = None,
):
    """Base vs ablated (vs patched): NLL, PPL, KL, top-1 agreement, super activation, generations side by side,
    and zero-shot task accuracies with --tasks."""
    from superweight.core.coords import parse_coords
    from superweight.io.files import check_writable
    from superweight.io.patchfile import load_patch
    from superweight.known import published
    from superweight.measure.generate import DEFAULT_PROMPTS
    from superweight.measure.metrics import n_scored
    from superweight.stages.evaluate import run_eval

    # Everything that can be checked without the model is checked before the (slow) load.
    if patch and ablate:
        raise UsageError("--patch brings its own ablation; give --ablate or --patch, not both")
    patch_data = load_patch(patch) if patch else None
    coords = patch_data.ablated if patch_data else parse_coords(ablate) if ablate else published(model)
    corpora.check_windows(max_length, stride)
    check_bos(bos)
    if max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2, got {max_tokens}")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if json_:
        check_writable(json_)
    text = corpora.load_text(corpus, split)
    task_set = task_spec(tasks, include_path, task_limit)
    loaded = load_model(model, device, dtype, device_map, max_memory, offload_folder, bos)
    if not coords:
        err.print("No --ablate given and no published super weight for this model: base metrics only.",
                  soft_wrap=True)
    ids = corpora.tokenize(loaded.tokenizer, text, max_tokens)
    prompts = prompt or DEFAULT_PROMPTS
    with progress() as bar:
        total = n_scored(ids.numel(), max_length, stride, loaded.bos is not None)
        on_tokens, on_prompt = token_and_prompt_tasks(bar, total, len(prompts))
        lm_bar = bar.add_task("lm-eval tasks", total=None, visible=task_set is not None)
        result = run_eval(
            loaded, coords, corpus, split, max_tokens, max_length, stride, prompts, max_new_tokens, ids=ids,
            on_tokens=on_tokens, on_prompt=on_prompt, patch=patch_data, tasks=task_set,
            on_task=lambda name: bar.update(lm_bar, description=f"lm-eval tasks: {name}"),
        )
    terminal.print_eval(out, result)
    write_result(json_, result)


@app.command()
@errors
def detect(
    model: ModelOpt = DEFAULT_MODEL,
    prompt: Annotated[Optional[list[str]], typer.Option(help="scan prompt (repeatable); default: the paper's + 3")] = None,
    max_candidates: Annotated[int, typer.Option(help="most spike-scan rounds (one weight each)")] = 8,
    spike_ratio: Annotated[float, typer.Option(help="a layer is an outlier when its output spike is this many times the median layer's")] = 50.0,
    attribution: Annotated[str, typer.Option(help="activation (|W|*max|x|), gradient (|w*dL/dw|) or none")] = "activation",
    attribution_top: Annotated[int, typer.Option(help="attribution candidates to verify")] = 3,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="measure each candidate's damage vs controls")] = True,
    corpus: CorpusOpt = corpora.DEFAULT_CORPUS,
    split: Annotated[str, typer.Option(help="calibration split")] = "train",
    calib_tokens: Annotated[int, typer.Option(help="calibration tokens for attribution and verification")] = 2048,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    min_kl: Annotated[float, typer.Option(help="least KL (nats/token) for a confirmed super weight")] = 0.1,
    control_factor: Annotated[float, typer.Option(help="confirmed KL must be this many times the worse control's")] = 10.0,
    seed: int = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    bos: BosOpt = "auto",
    json_: JsonOpt = None,
):
    """Find super weights: iterative spike scan + attribution, each confirmed by the damage its removal does."""
    from superweight.io.files import check_writable
    from superweight.measure.metrics import n_scored
    from superweight.stages.detect import DetectConfig, run_detect

    if attribution not in {"activation", "gradient", "none"}:
        raise UsageError(f"unknown attribution '{attribution}': use activation, gradient or none")
    check_detect_options(max_length, bos, calib_tokens, max_candidates, attribution_top)
    for name, value in [("--spike-ratio", spike_ratio), ("--control-factor", control_factor)]:
        if not value > 0:
            raise UsageError(f"{name} must be positive, got {value:g}")
    if not min_kl >= 0:
        raise UsageError(f"--min-kl must be at least 0, got {min_kl:g}")
    cfg = DetectConfig(
        prompts=prompt, max_candidates=max_candidates, spike_ratio=spike_ratio,
        attribution=None if attribution == "none" else attribution, attribution_top=attribution_top, verify=verify,
        corpus=corpus, split=split, calib_tokens=calib_tokens, max_length=max_length, min_kl=min_kl,
        control_factor=control_factor, seed=seed,
    )
    if json_:
        check_writable(json_)
    text = corpora.load_text(corpus, split) if (verify or attribution != "none") else None
    loaded = load_model(model, device, dtype, device_map, max_memory, offload_folder, bos)
    ids = corpora.tokenize(loaded.tokenizer, text, calib_tokens) if text is not None else None
    with progress() as bar:
        task = bar.add_task("Detecting", total=None)

        def stage(name: str) -> None:
            verifying = name.startswith("Verifying")
            total = n_scored(ids.numel(), max_length, bos=loaded.bos is not None) if verifying else None
            bar.update(task, description=name, total=total, completed=0)

        result = run_detect(loaded, cfg, ids=ids, on_stage=stage, on_tokens=lambda n: bar.advance(task, n))
    terminal.print_detect(out, result)
    write_result(json_, result)


@app.command()
@errors
def sweep(
    weight: Annotated[str, typer.Option(help="LAYER:ROW:COL of the weight to scale")],
    model: ModelOpt = DEFAULT_MODEL,
    scales: Annotated[str, typer.Option(help="comma-separated factors")] = "1,0.5,0,-1,2",
    spread: Annotated[int, typer.Option(help="also zero it and add value/N to the next N columns (0: skip)")] = 8,
    corpus: CorpusOpt = corpora.DEFAULT_CORPUS,
    split: SplitOpt = "eval",
    max_tokens: Annotated[int, typer.Option(help="tokens of the corpus to evaluate")] = 4096,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    prompt: Annotated[Optional[list[str]], typer.Option(help="generation prompt (repeatable)")] = None,
    max_new_tokens: int = 20,
    plot: Annotated[Optional[str], typer.Option(help="PNG path (default runs/sweep/L-R-C.png)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    bos: BosOpt = "auto",
    json_: JsonOpt = None,
):
    """Scale one weight (and spread it): NLL/PPL/KL/top-1 and generations per scale, plus a PNG plot."""
    from superweight.core.coords import parse_coord
    from superweight.io.files import check_writable
    from superweight.measure.generate import DEFAULT_PROMPTS
    from superweight.measure.metrics import n_scored
    from superweight.report.plots import save_sweep_plot as plot_sweep
    from superweight.stages.sweep import run_sweep

    coord = parse_coord(weight)
    if "@" in weight:
        raise UsageError("--weight takes LAYER:ROW:COL without @SCALE; give factors with --scales")
    try:
        factors = [float(x) for x in scales.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"invalid --scales '{scales}': expected comma-separated numbers, e.g. 1,0.5,0,-1,2") from None
    if not factors:
        raise UsageError("--scales is empty")
    if spread < 0:
        raise UsageError(f"--spread must be >= 0, got {spread}")
    if max_tokens < 2 or max_new_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 2 and --max-new-tokens at least 1, got {max_tokens} "
                         f"and {max_new_tokens}")
    corpora.check_windows(max_length)
    check_bos(bos)
    png = plot or f"runs/sweep/{'-'.join(map(str, coord.key))}.png"  # 11-507-1229, or 3-17-507-1229 in an expert
    for path in filter(None, [json_, png]):
        check_writable(path)
    text = corpora.load_text(corpus, split)
    loaded = load_model(model, device, dtype, device_map, max_memory, offload_folder, bos)
    ids = corpora.tokenize(loaded.tokenizer, text, max_tokens)
    prompts = prompt or DEFAULT_PROMPTS
    with progress() as bar:
        on_tokens, on_prompt = token_and_prompt_tasks(
            bar, n_scored(ids.numel(), max_length, bos=loaded.bos is not None), len(prompts))
        result = run_sweep(
            loaded, coord, factors, spread or None, corpus, split, max_tokens, max_length, prompts,
            max_new_tokens, ids=ids, on_tokens=on_tokens, on_prompt=on_prompt,
        )
    terminal.print_sweep(out, result)
    plot_sweep(result, png)
    err.print(f"Wrote {png}")
    write_result(json_, result)
