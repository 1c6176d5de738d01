"""The one-shot job behind `superweight run`: detect -> ablate -> repair with baselines -> analyse -> report.

    record = run_pipeline(loaded, Path("runs/demo"))    # runs/demo/report.html
    record = run_pipeline(loaded, Path("runs/x"), PipelineJob(sparse=True, repair=RepairJob(recipe="quick")))

Each stage is the library function its own command calls (detect.run_detect, repair.run_repair,
analyze.run_analyze, sparsify.run_sparsify, report.write_report); this module only chains them, records
seconds and model work (stages/account.Stages, in eval-pass equivalents) per stage, and keeps the detection beside
the repair in the run directory. The record goes from stage to stage in memory where the stage takes it; each
stage writes it at most once, and the pipeline once at the end (detection summary and timings), after the report.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from superweight.core.coords import WeightCoord, row_of
from superweight.engine.train import training_data
from superweight.measure.metrics import Passes
from superweight.stages.shared import Shared
from superweight.errors import SuperweightError
from superweight.io.files import write_json
from superweight.io.models import Loaded
from superweight.schema.record import DetectSummary, RunRecord
from superweight.io.rundir import DETECT, RunDir
from superweight.progress import Prefixed, Progress, or_silent
from superweight.settings import Settings, revalidated
from superweight.stages.account import Stages
from superweight.stages.repair import RepairJob

# Detection settings for the one-shot run: a quarter of the calibration text of `superweight detect` (the damage of a
# real super weight is ~1000x its controls', so 512 tokens decide it; the 5-minute budget needs the time).
CALIB_TOKENS = 512


class PipelineJob(Settings):
    """What `superweight run` does (its defaults): the repair's job, and what runs after it."""

    weight: WeightCoord | None = Field(None, description="the weight to repair (None: detect one)")
    repair: RepairJob = Field(default_factory=lambda: RepairJob(eval_tokens=2048, baselines=True),
                              description="the repair: recipe, corpus, eval tokens, baselines, seeds, resume, tasks")
    analysis_tokens: int = Field(1024, ge=2, description="eval-split tokens for the analyses")
    draws: int = Field(2, ge=1, description="random-k control draws per k")
    sparse: bool = Field(False, description="also train sparse patches (L1, L0) over a sweep of strengths")
    quantize: bool = Field(False, description="also 4-bit RTN at blocks 64/128/256/channel, the weight protected")
    regime: bool = Field(True, description="also repair with the deleted weight's column held at 0, to name the "
                                           "regime (restoration or compensation) and what each recovers")


def run_pipeline(loaded: Loaded, out: Path, job: PipelineJob | None = None,
                 progress: Progress | None = None) -> RunRecord:
    """Detect (unless `job.weight`), repair, repair again with the deleted weight's column held at 0 (`job.regime`,
    unless the repair excludes columns itself: `record.regime`, timed as "repair (deleted excluded)"), analyse,
    optionally sparsify and quantize, and report, in `out`.

    `job.repair.resume` continues a run killed in `out`: detection runs again (it is deterministic), the repair
    resumes from its checkpoint (or keeps its finished results), and the later stages run again.
    `job.repair.tasks` (measure.tasks.prepare_tasks) adds zero-shot task metrics of base, broken and patched to
    the repair. `job.quantize` adds 4-bit RTN at blocks 64, 128, 256 and per channel with the repaired weight
    protected (stages/quantize.py): quantize.json, and a section and figure in the report."""
    job = job or PipelineJob()
    progress = or_silent(progress)
    if not job.repair.resume:
        RunDir(out).check_new()
    stages = Stages(loaded.model)
    with stages.ledger:
        return _stages(loaded, out, job, progress, stages)


def _stages(loaded: Loaded, out: Path, job: PipelineJob, progress: Progress, stages: Stages):
    from superweight.report import write_report
    from superweight.stages.analyze import AnalyzeConfig, run_analyze
    from superweight.stages.compensate import DELETED_STAGE, without_deleted
    from superweight.stages.detect import DetectConfig, run_detect
    from superweight.stages.repair import run_repair
    from superweight.stages.sparsify import SparsifyConfig, run_sparsify

    corpus, weight, detected = job.repair.corpus, job.weight, None
    if weight is None:
        with stages("detect"):
            detected = run_detect(loaded, DetectConfig(corpus=corpus, calib_tokens=CALIB_TOKENS),
                                  progress=Prefixed(progress, "Detect: "))
        chosen = _choose(detected.candidates)
        if chosen is None:
            best = detected.candidates[0] if detected.candidates else None
            hint = f" (strongest candidate {best.coord}, KL {best.kl:.3g})" if best and best.kl is not None else ""
            raise SuperweightError(f"detection found no super weight and no sensitive weight in {loaded.spec}{hint}; "
                                   "pass --weight LAYER:ROW:COL to repair one anyway")
        weight = chosen.coord
    else:
        stages.timings["detect"] = 0.0
    # One set of training sequences for both repairs (the intact model's targets are computed once), and one base
    # pass over the eval windows for the repair, the second repair and the analyses.
    shared = Shared(training_data(loaded.tokenizer, corpus, job.repair.config, loaded.bos), Passes())
    with stages("repair"):
        # analyze measures the patch geometry's write numbers again, on its own tokens: the repair skips them.
        record, _patch = run_repair(loaded, [weight], [row_of(weight)], out, revalidated(job.repair, write_stats=False),
                                    progress, shared)
    if detected is not None:
        write_json(out / DETECT, detected.model_dump())
    if job.regime and not job.repair.exclude:  # the second point: the same repair without the deleted weight
        with stages(DELETED_STAGE.lower()):
            regime = without_deleted(loaded, out, record, job.repair.eval_tokens, progress, shared)
        record = revalidated(record, regime=regime)
    with stages("analyze"):
        record = run_analyze(loaded, out, AnalyzeConfig(tokens=job.analysis_tokens, draws=job.draws), progress,
                             record, shared.passes)
    if job.sparse:
        with stages("sparsify"):
            record = run_sparsify(loaded, out, SparsifyConfig(tokens=job.analysis_tokens), progress, record)
    if job.quantize:
        from superweight.schema.quantize import QUANTIZE_FILE
        from superweight.stages.quantize import QuantizeConfig, run_quantize

        with stages("quantize"):
            progress.stage("Quantizing (4-bit RTN, blocks 64/128/256/channel)", None)
            settings = QuantizeConfig(keep=[weight], keep_source="detected" if detected is not None else "given",
                                      corpus=corpus, max_tokens=job.repair.eval_tokens)
            quantized = run_quantize(loaded, settings, progress=Prefixed(progress, "Quantizing: "))
            write_json(out / QUANTIZE_FILE, quantized.model_dump())
    fed = stages.eval_feed(loaded, record, job.repair.eval_tokens)
    record = revalidated(record, detect=_detect_summary(detected, weight), timings=dict(stages.timings),
                         cost=stages.account(fed))
    progress.stage("Writing the report", None)
    with stages("report"):
        write_report(out, record)
    record = revalidated(record, timings=dict(stages.timings), cost=stages.account(fed))
    RunDir(out).write(record)  # the pipeline's one write: a finished run has timings.report
    return record




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
