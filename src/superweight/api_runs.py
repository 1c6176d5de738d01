"""The API's commands on a run directory that `repair` or `run` wrote (api.py re-exports them): analyze, sparsify,
compensate and write_report, each the library call its command makes (cli/analysis.py).

    import superweight as sw
    m = sw.load()
    sw.repair(m, "11:507:1229", out="runs/mine")
    sw.analyze(m, "runs/mine")                              # RunRecord with .sparsity, .tokens, .neurons, ...
    sw.sparsify(m, "runs/mine", strengths={"l1": (0.8,)})  # RunRecord with .sparse_training
    sw.compensate(m, "runs/mine", max_k=8)                 # RunRecord with .compensation; report rewritten
    sw.write_report("runs/mine")                           # report.md and report.html

Each checks the directory (io/rundir.RunDir: it holds a run), takes its writer lock, and then loads the model when
given a Later: the run's own model and text protocol (--bos) unless the Later names them.
"""

from __future__ import annotations

from pathlib import Path

from superweight.api_tools import Later, held
from superweight.io.models import DEFAULT_MODEL, Loaded
from superweight.schema.record import RunRecord
from superweight.io.rundir import RunDir
from superweight.settings import build
from superweight.stages.analyze import AnalyzeConfig
from superweight.stages.compensate import CompensateConfig
from superweight.stages.sparsify import SparsifyConfig


def _continue(run_dir: str | Path, command: str):
    """The run directory, checked to hold a run before anything is locked or loaded, and its lock for `command`."""
    run = RunDir(run_dir).check_existing()
    return run, run.lock(command)


def _model(m: Loaded | Later, run: RunDir) -> Loaded:
    """`m`, or `m` loaded now: the run's model (its patch's spec) with the run's text protocol, unless m names them."""
    if isinstance(m, Loaded):
        return m
    return held(m, None if m.spec else run.spec(DEFAULT_MODEL), m.bos or run.bos())


def analyze(loaded: Loaded | Later, run_dir: str | Path, config: AnalyzeConfig | None = None, progress=None,
            **overrides) -> RunRecord:
    """Study a repair's patch (`superweight analyze`): its geometry, the patch cut to its top-k entries against a
    random-k control, the tokens it hurts and heals, the neurons it reads, and a scale sweep of the weight.

    Args:
        loaded: the model the run was made on, from load() (or a Later: by default the run's own).
        run_dir: a run directory written by repair() or run().
        config=None: an AnalyzeConfig (stages/analyze.py); None for its defaults (the command's).
        progress=None: a superweight.progress.Progress that hears of each stage (None: silent).
        **overrides: AnalyzeConfig fields that replace the config's:
            tokens=2048: eval-split tokens to analyse on.
            draws=3: random-k control draws per k.

    Returns the updated RunRecord (also written to run_dir/results.json).
    """
    from superweight.stages.analyze import run_analyze

    cfg = build(AnalyzeConfig, config, "", **overrides)
    run, lock = _continue(run_dir, "analyze")
    with lock:  # one writer, or refused here, before the model loads
        return run_analyze(_model(loaded, run), run.path, cfg, progress)


def sparsify(loaded: Loaded | Later, run_dir: str | Path, config: SparsifyConfig | None = None, progress=None,
             **overrides) -> RunRecord:
    """Train sparse patches (L1, hard-concrete L0) from a repair's patch over a sweep of strengths
    (`superweight sparsify`): the recovery-vs-size frontier, written into the run directory.

    Args:
        loaded: the model the run was made on, from load() (or a Later: by default the run's own).
        run_dir: a run directory written by repair() or run().
        config=None: a SparsifyConfig (stages/sparsify.py); None for its defaults (the command's).
        progress=None: a superweight.progress.Progress that hears of each training and its steps (None: silent).
        **overrides: SparsifyConfig fields that replace the config's:
            strengths={'l1': (0.6, 0.8, 1.0), 'l0': (1.0, 10.0, 30.0)}: method -> penalty strengths.
            steps=None: steps per sparse patch (None: half the run's).
            tokens=2048: eval-split tokens to score each patch on.
            max_length=512: window length in tokens.

    Returns the updated RunRecord (.sparse_training), also written to run_dir/results.json.
    """
    from superweight.stages.sparsify import run_sparsify

    cfg = build(SparsifyConfig, config, "", **overrides)
    run, lock = _continue(run_dir, "sparsify")
    with lock:
        return run_sparsify(_model(loaded, run), run.path, cfg, progress)


def compensate(loaded: Loaded | Later, run_dir: str | Path, config: CompensateConfig | None = None, progress=None,
               **overrides) -> RunRecord:
    """The compensation frontier (`superweight compensate`): the run repaired again with the top 1, 2, 4, ...
    writing neurons held at 0 (greedy), until the held-out KL recovery is below `stop_below` or `max_k` neurons
    are out; results.json and the report are rewritten.

    Args:
        loaded: the model the run was made on, from load() (or a Later: by default the run's own).
        run_dir: a run directory written by repair() or run().
        config=None: a CompensateConfig (stages/compensate.py); None for its defaults (the command's).
        progress=None: a superweight.progress.Progress that hears of each point's training (None: silent).
        **overrides: CompensateConfig fields that replace the config's:
            max_k=64: the budget: exclude at most this many writing neurons.
            stop_below=0.1: stop once a point's held-out KL recovery falls below this.
            tokens=1024: eval-split tokens to score each point on.
            steps=None: cap on each point's steps (lbfgs: loss evaluations); None: the run's recipe.

    Returns the updated RunRecord (.compensation: the frontier, shown as its table and plot).
    """
    from superweight.report import write_report as write
    from superweight.stages.compensate import run_compensate

    cfg = build(CompensateConfig, config, "", **overrides)
    run, lock = _continue(run_dir, "compensate")
    with lock:
        record = run_compensate(_model(loaded, run), run.path, cfg, progress)
        write(run.path, record)
    return record


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md (with plots/*.png) and report.html (self-contained) for a run directory (`superweight report`);
    never from a run that another process is writing (its lock is held meanwhile). Returns (report.md, report.html).

    Args:
        run_dir: a run directory written by repair() or run().
    """
    from superweight.report import write_report as write

    run, lock = _continue(run_dir, "report")
    with lock:
        return write(run.path)
