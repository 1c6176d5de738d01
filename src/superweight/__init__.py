"""superweight: detect, ablate, measure and repair super weights in causal language models.

    import superweight as sw
    m = sw.load()                                        # the embedded SmolLM2-135M; sw.load("allenai/OLMo-1B-0724-hf")
    found = sw.detect(m)                                 # DetectResult
    sw.evaluate(m, ablate="11:507:1229")                 # EvalResult: base vs ablated
    fixed = sw.repair(m, "11:507:1229", out="runs/mine")    # RepairResult: .record (results.json), .patch
    fixed = sw.repair(m, "11:507:1229")                  # the same in memory: nothing written
    with fixed.patch.apply(): ...                        # the ablated model, repaired; undone on exit
    sw.analyze(m, "runs/mine"); sw.read_run("runs/mine"); sw.compare("runs/mine", "runs/other")
    sw.run(m)                                            # all of it, ending in report.html
    sw.quantize(sw.load(dtype="fp32"))                   # QuantResult
    with sw.Ablation(m, "11:507:1229"): ...              # undone on exit, bit for bit

Functions, one per command: load, info, detect, evaluate, sweep, repair, analyze, sparsify, compensate, run,
quantize, census, apply, compare, write_report (`report`); read_run, load_patch. Each takes a model from load() or
a Later (the model to load once the inputs are checked: how the CLI calls them). Interventions (context
managers): Ablation, Spread, RowPatch, Compose, ActivationRestore, QuantizedWeights, QuantizedInputs. Settings:
DetectConfig, RepairConfig (LbfgsConfig | FirstOrderConfig), RECIPES, RepairJob, PipelineJob, EvalConfig,
QuantizeConfig, Placement, Bos.
Results: DetectResult, EvalResult, RepairResult (with its Patch), RunRecord, QuantResult, Comparison; in a notebook
each shows its tables (and plots).
help(sw.repair) etc. for every setting.

The names load on first use (superweight/api.py), so `import superweight` itself stays fast; the deep modules
(superweight.core, io, measure, stages, report) stay importable as before.
References: Yu et al., "The Super Weight in Large Language Models" (Apple, 2024); docs/architecture.md.
"""

__version__ = "0.1.0"

from superweight.errors import SuperweightError  # noqa: E402

__all__ = [
    "load", "detect", "evaluate", "repair", "analyze", "compensate", "run", "quantize", "compare", "read_run",
    "write_report", "info", "sweep", "sparsify", "census", "apply", "RepairResult", "Patch",
    "Intervention", "Ablation", "Spread", "RowPatch", "Compose", "ActivationRestore", "QuantizedWeights",
    "QuantizedInputs", "DetectConfig", "RepairConfig", "LbfgsConfig", "FirstOrderConfig", "RECIPES", "RepairJob", "PipelineJob", "EvalConfig",
    "QuantizeConfig", "Placement", "Loaded", "Bos", "DetectResult", "EvalResult",
    "RunRecord", "QuantResult", "Comparison", "Compensation", "CompareRow", "PatchData", "WeightCoord", "parse_coord",
    "load_patch", "Later", "SuperweightError", "__version__",
]


def __getattr__(name: str):
    """The API's names, imported from superweight/api.py on first use (PEP 562)."""
    if name not in __all__:
        raise AttributeError(f"module 'superweight' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module("superweight.api"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
