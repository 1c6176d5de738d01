"""The run directory: the one place that names its files, and the one reader and writer of the run record.

RUN_DIR/
  config.json        what was asked (recipe, model, weights, rows, corpus); a resumed run must match it
  train_log.jsonl    one line per step: step, loss, lr, seconds
  checkpoints/last.pt
  patch.safetensors + patch_config.json   (io/patchfile.py)
  results.json       the run record (io/record.py), which each stage extends (docs/results.md)
  detect.json        the full detection (`superweight run`)
  report.md, report.html, plots/*.png
  .superweight.lock, .superweight.lock.json   while a command writes here (io/lock.py: one writer at a time)

    record = read_record(run_dir)          # migrated from older formats, or one clear error
    write_record(run_dir, record)          # atomic (io/files.py)

Its states (new, started, trained, finished) and what each allows: io/runstate.py. The train log's reader:
io/checkpoint.py. Provenance: io/provenance.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from superweight.errors import SuperweightError
from superweight.io.files import read_json, write_json
from superweight.io.migrate import parse
from superweight.io.record import RunRecord

CONFIG = "config.json"
RESULTS = "results.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT = "checkpoints/last.pt"
DETECT = "detect.json"
REPORT_MD, REPORT_HTML, PLOTS = "report.md", "report.html", "plots"
LOCK, LOCK_HOLDER = ".superweight.lock", ".superweight.lock.json"  # io/lock.py; not part of the run


def read_record(run_dir: str | os.PathLike) -> RunRecord:
    """The run record in RUN_DIR/results.json, lifted to the current schema (io/migrate.py)."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS
    if not path.is_file():
        raise SuperweightError(f"no results.json in {run_dir}: run `superweight repair --out {run_dir}` first")
    record = parse(read_json(path, "results"), str(path))
    record._run_dir = run_dir
    return record


def write_record(run_dir: str | os.PathLike, record: RunRecord) -> Path:
    """Write RUN_DIR/results.json atomically; parts of stages that have not run are left out."""
    absent = {name for name in RunRecord.model_fields if getattr(record, name) is None}
    record._run_dir = Path(run_dir)
    return write_json(Path(run_dir) / RESULTS, record.model_dump(exclude=absent))
