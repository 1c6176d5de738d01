"""Wall time of the one-shot `superweight run` against its 5-minute budget (issue 5), as a new user meets it.

Runs the installed CLI in a subprocess with an empty model cache (SUPERWEIGHT_CACHE points at a fresh temp
dir, so the GGUF is parsed and converted as on a fresh machine) and a fresh run directory, then prints the
wall time, its ratio to the budget (target < 1), and the seconds per stage the run recorded in results.json
(model loading is the wall time not covered by a stage). Extra arguments go to `superweight run`.

    .venv/bin/python benchmarks/bench_run.py [--budget 300] [-- --recipe sgd]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds the run must stay under")
    parser.add_argument("run_args", nargs="*", help="extra `superweight run` arguments (after --)")
    args = parser.parse_args()
    cli = Path(sys.executable).with_name("superweight")
    scratch = Path(tempfile.mkdtemp(prefix="bench_run_"))
    out = scratch / "run"
    env = {**os.environ, "SUPERWEIGHT_CACHE": str(scratch / "cache")}
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([str(cli), "run", "--out", str(out), *args.run_args], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"superweight run failed ({proc.returncode}): {proc.stderr.strip()}")
        timings = json.loads((out / "results.json").read_text())["timings"]
        load = wall - sum(timings.values())
        print(f"superweight run {' '.join(args.run_args)} (empty model cache, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f})")
        print("stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in {"load and start-up": load, **timings}.items()))
        print(f"wall {wall:.0f} s / budget {args.budget:.0f} s = ratio {wall / args.budget:.3f} "
              f"({'OK' if wall < args.budget else 'MISS'})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
