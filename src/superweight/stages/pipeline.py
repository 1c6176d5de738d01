"""The one-shot job behind `superweight run`: detect -> ablate -> repair with baselines -> analyse -> report.

    record = run_pipeline(loaded, Path("runs/demo"))    # runs/demo/report.html

Each stage is the library function its own command calls (detect.run_detect, repair.run_repair,
analyze.run_analyze, sparsify.run_sparsify, report.write_report); this module only chains them, records
seconds per stage, and keeps the detection beside the repair in the run directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from superweight.core.coords import WeightCoord, row_of
from superweight.errors import SuperweightError, UsageError
from superweight.io import corpora
from superweight.io.files import write_json
from superweight.io.models import Loaded
from superweight.io.record import DetectSummary, RunRecord
from superweight.io.rundir import DETECT, read_record, write_record
from superweight.io.runstate import check_new_run_dir, run_state
from superweight.stages.train import RepairConfig

# Detection settings for the one-shot run: a quarter of the calibration text of `superweight detect` (the damage of a
# real super weight is ~1000x its controls', so 512 tokens decide it; the 5-minute budget needs the time).
CALIB_TOKENS = 512


def run_pipeline(
    loaded: Loaded,
    out: Path,
    weight: WeightCoord | None = None,
    cfg: RepairConfig | None = None,
    recipe: str = "lbfgs",
    corpus: str = corpora.DEFAULT_CORPUS,
    eval_tokens: int = 2048,
    analysis_tokens: int = 1024,
    draws: int = 2,
    baselines: bool = True,
    seeds: int = 1,
    sparse: bool = False,
    on_stage: Callable[[str, int | None], None] | None = None,
    on_advance: Callable[[int, float | None], None] | None = None,
    resume: bool = False,
    tasks=None,
    quantize: bool = False,
) -> RunRecord:
    """`resume` continues a run killed in `out`: detection runs again (it is deterministic), the repair
    resumes from its checkpoint (or keeps its finished results), and the later stages run again. `tasks`
    (measure.tasks.prepare_tasks) adds zero-shot task metrics of base, broken and patched to the repair. `quantize`
    adds 4-bit RTN at blocks 64, 128, 256 and per channel with the repaired weight protected (stages/quantize.py):
    quantize.json, and a section and figure in the report."""
    from superweight.report import write_report
    from superweight.stages.analyze import run_analyze
    from superweight.stages.detect import DetectConfig, run_detect
    from superweight.stages.repair import run_repair
    from superweight.stages.sparsify import run_sparsify
    from superweight.stages.train import RECIPES

    stage = on_stage or (lambda *_: None)
    tokens = (lambda n: on_advance(n, None)) if on_advance else None
    cfg = cfg or RECIPES[recipe]
    if not resume:
        check_new_run_dir(out)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    detected = None
    if weight is None:
        detected = run_detect(loaded, DetectConfig(corpus=corpus, calib_tokens=CALIB_TOKENS),
                              on_stage=lambda name: stage(f"Detect: {name}", None))
        chosen = _choose(detected.candidates)
        if chosen is None:
            best = detected.candidates[0] if detected.candidates else None
            hint = f" (strongest candidate {best.coord}, KL {best.kl:.3g})" if best and best.kl is not None else ""
            raise SuperweightError(f"detection found no super weight and no sensitive weight in {loaded.spec}{hint}; "
                                   "pass --weight LAYER:ROW:COL to repair one anyway")
        weight = chosen.coord
    timings["detect"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = [row_of(weight)]
    run_repair(loaded, [weight], rows, cfg, recipe, out, corpus, eval_tokens, 512, baselines, seeds, resume,
               on_stage=stage, on_advance=on_advance, tasks=tasks)
    timings["repair"] = time.perf_counter() - t
    if detected is not None:
        write_json(out / DETECT, detected.model_dump())
    t = time.perf_counter()
    record = run_analyze(loaded, out, analysis_tokens, draws, on_stage=stage, on_tokens=tokens)
    timings["analyze"] = time.perf_counter() - t
    if sparse:
        t = time.perf_counter()
        record = run_sparsify(loaded, out, n_tokens=analysis_tokens, on_stage=stage, on_advance=on_advance)
        timings["sparsify"] = time.perf_counter() - t
    if quantize:
        from superweight.io.quantrecord import QUANTIZE_FILE
        from superweight.stages.quantize import run_quantize

        t = time.perf_counter()
        stage("Quantizing (4-bit RTN, blocks 64/128/256/channel)", None)
        quantized = run_quantize(loaded, [4], [64, 128, 256, "channel"], keep=[weight],
                                 keep_source="detected" if detected is not None else "given", corpus=corpus,
                                 max_tokens=eval_tokens, on_condition=lambda name: stage(f"Quantizing: {name}", None))
        write_json(out / QUANTIZE_FILE, quantized.model_dump())
        timings["quantize"] = time.perf_counter() - t
    record = record.model_copy(update={"detect": _detect_summary(detected, weight), "timings": timings})
    write_record(out, record)
    stage("Writing the report", None)
    t = time.perf_counter()
    write_report(out)
    record.timings["report"] = time.perf_counter() - t
    write_record(out, record)
    return record


def check_out(path: Path, resume: bool) -> str | None:
    """Refuse an --out that a fresh run or --resume may not write into; "finished" for a finished run (`run` and
    superweight.run check it before the directory is made or locked, and again once it is locked)."""
    if not resume:
        check_new_run_dir(path)
    elif run_state(path) == "other":
        raise UsageError(f"{path} holds files but no config.json: not a run directory; choose another --out")
    elif (path / "report.html").is_file() and (read_record(path).timings or {}).get("report") is not None:
        return "finished"
    return None


def _choose(candidates):
    """The most damaging super weight, else the most damaging sensitive weight, else None (candidates come
    ranked by the damage their removal does)."""
    for wanted in ("super weight", "sensitive weight"):
        found = [c for c in candidates if c.grade == wanted]
        if found:
            return found[0]
    return None


def _detect_summary(detected, weight: WeightCoord) -> DetectSummary:
    if detected is None:
        return DetectSummary(weight=str(weight), note="given with --weight")
    chosen = next(c for c in detected.candidates if c.coord == weight)
    return DetectSummary(weight=str(weight), grade=chosen.grade, protocol=detected.protocol,
                         candidates=detected.candidates)
