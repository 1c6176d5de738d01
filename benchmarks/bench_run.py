"""What `superweight run` costs, in units that travel between machines: its model work per stage in eval-pass
equivalents (the run's cost account, core/cost.py), and its wall time over the wall time of one plain forward
pass of the eval text, both measured in this process on the same loaded model.

Loads the model once (from the cache; --fresh-cache converts the GGUF into an empty cache first, as a new user
meets it), times a plain pass of the run's eval tokens (no condition: what the unit of the account counts),
then runs the pipeline in a fresh run directory and prints seconds and eval-pass equivalents per stage, the
total, the ratio, and the load average. Extra `run` settings: --model, --dtype, --eval-tokens, --budget.

    .venv/bin/python benchmarks/bench_run.py [--model smollm2-135m] [--dtype fp32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="fp32", help="fp32 (the issue's numbers), bf16 or auto")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds the run should stay under")
    parser.add_argument("--fresh-cache", action="store_true", help="convert the model into an empty cache first")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--keep", help="run in this directory (new) and keep it")
    parser.add_argument("--no-regime", action="store_true", help="without run's second repair (the deleted weight "
                                                                 "held at 0): sw.run(regime=False)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench_run_"))
    if args.fresh_cache:
        os.environ["SUPERWEIGHT_CACHE"] = str(scratch / "cache")
    from superweight.io import corpora, models
    from superweight.io.placement import Placement
    from superweight.measure.metrics import measure
    from superweight.stages.pipeline import PipelineJob, run_pipeline
    from superweight.stages.repair import RepairJob

    try:
        t0 = time.perf_counter()
        loaded = models.load(args.model, Placement(device=args.device, dtype=args.dtype))
        load = time.perf_counter() - t0
        ids = corpora.tokenize(loaded.tokenizer, corpora.load_text(corpora.DEFAULT_CORPUS, "eval"), args.eval_tokens)
        measure(loaded.model, ids[:64], bos=loaded.bos)  # warm-up
        sync()
        t0 = time.perf_counter()
        measure(loaded.model, ids, bos=loaded.bos)
        sync()
        plain = time.perf_counter() - t0
        job = PipelineJob(repair=RepairJob(eval_tokens=args.eval_tokens, baselines=True), regime=not args.no_regime)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        record = run_pipeline(loaded, Path(args.keep) if args.keep else scratch / "run", job)
        wall = time.perf_counter() - t0
        cost = record.cost
        print(f"superweight run -m {args.model} --dtype {loaded.dtype} on {loaded.device} ({os.cpu_count()} CPUs, load average "
              f"{load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after; model load {load:.0f} s, not counted)")
        regime = record.regime and record.regime.without_deleted
        print(f"weight {record.weight}, verdict {record.verdict}, NLL-gap recovery {record.recovery.nll_gap:.3%}"
              + (f"; without the deleted weight {regime.nll_gap:.1%}" if regime and regime.nll_gap is not None else ""))
        print(f"{'stage':<26} {'seconds':>8} {'fwd passes':>11} {'bwd passes':>11} {'total':>7}   parts")
        for name, c in cost.stages.items():
            top = ", ".join(f"{k} {v:.2f}" for k, v in c.parts.items() if "/" not in k)
            print(f"{name:<26} {c.seconds or 0:8.1f} {c.forward:11.2f} {c.backward:11.2f} "
                  f"{c.forward + c.backward:7.2f}   {top}")
        second = cost.stages.get("repair (deleted excluded)")
        first = cost.total - (second.forward + second.backward if second else 0.0)
        print(f"{'run':<26} {wall:8.1f} {'':>11} {'':>11} {cost.total:7.2f}   (unit: {cost.eval_tokens} tokens x "
              f"{cost.layers} layers)")
        if second:
            print(f"{'run without the 2nd repair':<26} {wall - (second.seconds or 0):8.1f} {'':>11} {'':>11} "
                  f"{first:7.2f}")
        print(f"plain eval pass of {cost.eval_tokens} tokens: {plain:.2f} s; run / plain pass = {wall / plain:.1f} "
              f"(wall {wall:.0f} s / budget {args.budget:.0f} s = {wall / args.budget:.3f})")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "model": args.model, "dtype": args.dtype, "wall": wall, "plain": plain, "ratio": wall / plain,
                "load_average": os.getloadavg(), "load_before": load_before, "cost": cost.model_dump(),
                "total_without_second_repair": first, "timings": record.timings,
                "verdict": record.verdict, "weight": record.weight}, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
