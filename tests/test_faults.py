"""Fault injection: `superweight repair` (and `report`) killed with SIGKILL at seeded random moments - while
loading, training, logging, writing a checkpoint, evaluating, generating, writing the patch or the results, and
writing the report. After each kill every file in the run directory must parse, the lock the killed process held
must not block, and `repair --resume` (or a rerun of `report`) must end with the patch of an uninterrupted run,
bit for bit.

One driver process imports torch and superweight once and makes the uninterrupted run itself (which also pays
every first-call cost once); each other run is a forked child that arms one kill point by wrapping a function,
then calls the CLI in-process. Each run seeds what it uses, so the parent's earlier run cannot leak into it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from superweight.io import checkpoint
from superweight.io.checkpoint import read_train_log
from superweight.io.lock import LOCK, LOCK_HOLDER
from superweight.io.rundir import RunDir

TESTS_DIR = Path(__file__).resolve().parent
STEPS, CHECKPOINT_EVERY = 6, 2
REPAIR = ["repair", "--recipe", "balanced", "--weight", "1:5:7", "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "32",
          "--eval-tokens", "128", "--checkpoint-every", str(CHECKPOINT_EVERY), "--dtype", "fp32"]

# kill point -> how many times its function is called in one uninterrupted repair (the moment is drawn from these)
POINTS = {
    "load": 1,                      # io.models._from_pretrained returned, nothing written yet
    "training": STEPS,              # the k-th loss, before its step is logged
    "log_line": STEPS,              # half of the k-th log line written
    "checkpoint_write": STEPS // CHECKPOINT_EVERY,  # the k-th checkpoint's temp file half written
    "evaluation": 1,                # inside measure()
    "generation": 1,                # the greedy generation (base, broken and patched in one batch)
    "patch_write": 1,               # patch.safetensors' temp file written, not yet renamed
    "results_write": 1,             # results.json's temp file written, not yet renamed
    "report_write": 2,              # `superweight report`: report.md / report.html temp file written
}

DRIVER = textwrap.dedent('''
    import json, os, shutil, signal, sys, traceback
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from typer.testing import CliRunner

    import superweight.io.checkpoint as checkpoint
    import superweight.io.files as files
    import superweight.io.models as models
    import superweight.measure.generate as generate
    import superweight.stages.repair as repair
    import superweight.engine.objective as objective
    from superweight.cli import app

    model_dir, plan = sys.argv[1], json.loads(sys.argv[2])


    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


    def on_call(module, name, k, before=None, after=None):
        """Wrap module.name so that its k-th call dies (before it runs, or after)."""
        original, calls = getattr(module, name), [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k and before:
                before(*args, **kwargs)
            out = original(*args, **kwargs)
            if calls[0] == k and after:
                after(out, *args, **kwargs)
            return out

        setattr(module, name, wrapper)


    def half_line(run_dir, entry):
        with open(run_dir / "train_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry)[:12])
        die()


    def killed_write(names, k, truncate):
        """The k-th atomic write of a file in `names` dies after its temp file is written (cut to half if
        `truncate`), before the rename."""
        original, calls = files.write_atomic, [0]

        def wrapper(path, write):
            if Path(path).name not in names:
                return original(path, write)
            calls[0] += 1
            if calls[0] != k:
                return original(path, write)

            def write_then_die(tmp):
                write(tmp)
                if truncate:
                    data = tmp.read_bytes()
                    tmp.write_bytes(data[: len(data) // 2])
                die()

            return original(path, write_then_die)

        import superweight.report

        # Every module that writes through write_atomic (patchfile calls it as files.write_atomic).
        files.write_atomic = checkpoint.write_atomic = superweight.report.write_atomic = wrapper


    def arm(point, k):
        if point == "load":
            on_call(models, "_from_pretrained", k, after=lambda *a, **kw: die())
        elif point == "training":
            on_call(objective.Distillation, "loss", k, after=lambda *a, **kw: die())
        elif point == "log_line":
            original, calls = checkpoint.log_step, [0]

            def log_step(run_dir, entry):
                calls[0] += 1
                if calls[0] == k:
                    half_line(run_dir, entry)
                original(run_dir, entry)

            checkpoint.log_step = log_step
        elif point == "checkpoint_write":
            killed_write({"last.pt"}, k, truncate=True)
        elif point == "evaluation":
            on_call(repair, "measure", k, before=lambda *a, **kw: die())
        elif point == "generation":
            on_call(generate, "greedy", k, before=lambda *a, **kw: die())
        elif point == "patch_write":
            killed_write({"patch.safetensors"}, k, truncate=False)
        elif point == "results_write":
            killed_write({"results.json"}, k, truncate=False)
        elif point == "report_write":
            killed_write({"report.md", "report.html"}, k, truncate=True)


    for step in plan:
        sys.stdout.flush()
        if step.get("copy_from"):
            shutil.copytree(step["copy_from"], step["copy_to"], ignore=shutil.ignore_patterns("report.*", "plots"))
            continue
        if step.get("inline"):  # in this process: warms every lazy import and first-call cost for the children
            result = CliRunner().invoke(app, step["args"])
            print(json.dumps({"id": step["id"], "exit": result.exit_code, "stderr": result.stderr}), flush=True)
            print(json.dumps({"id": step["id"], "status": 0}), flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if step.get("point"):
                    arm(step["point"], step["k"])
                result = CliRunner().invoke(app, step["args"])
                print(json.dumps({"id": step["id"], "exit": result.exit_code, "stderr": result.stderr,
                                  "stdout": result.stdout[-2000:]}), flush=True)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"id": step["id"], "status": os.waitstatus_to_exitcode(status)}), flush=True)
        out = Path(step["snapshot"]) if step.get("snapshot") else None
        if out is not None and out.exists():  # what the kill left, before the next run touches it
            shutil.copytree(out, out.with_name(out.name + ".after-kill"))
''')


def _every_file_parses(run_dir: Path) -> None:
    """What a kill leaves must be readable: strict JSON, a log whose only bad line is a torn last one, a
    checkpoint that loads as data, a safetensors patch; no temp file outlives the next write of its file."""
    if not run_dir.exists():
        return
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        name = path.name
        if name.endswith(".tmp"):
            continue  # a killed writer's; write_atomic removes it when it writes that file again
        if name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"{path}: {c}"))
        elif name == "train_log.jsonl":
            lines = path.read_text(encoding="utf-8").split("\n")
            for line in lines[:-1]:
                json.loads(line)
            assert [e["step"] for e in read_train_log(run_dir)] == list(range(1, len(read_train_log(run_dir)) + 1))
        elif name == "last.pt":
            assert checkpoint.load(run_dir)["step"] % CHECKPOINT_EVERY == 0
        elif name.endswith(".safetensors"):
            load_file(str(path))


def _moments(seed: int = 11) -> list[tuple[str, int]]:
    """One seeded random moment per kill point (the k-th call of its function)."""
    rng = random.Random(seed)
    return [(point, rng.randint(1, calls)) for point, calls in POINTS.items()]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks")
def test_killed_runs_resume_to_the_uninterrupted_patch(tiny_model_dir, tmp_path):
    moments = _moments()
    full = tmp_path / "full"
    plan = [{"id": "full", "inline": True, "args": [*REPAIR, "--model", str(tiny_model_dir), "--out", str(full)]},
            {"id": "full:report", "inline": True, "args": ["report", str(full)]}]
    for point, k in moments:
        out = tmp_path / f"{point}-{k}"
        args = [*REPAIR, "--model", str(tiny_model_dir), "--out", str(out)]
        if point == "report_write":  # a finished repair, then `report` killed while writing
            plan.append({"id": f"{point}:setup", "copy_from": str(full), "copy_to": str(out)})
            plan.append({"id": f"{point}:killed", "point": point, "k": k, "args": ["report", str(out)],
                         "snapshot": str(out)})
            plan.append({"id": f"{point}:again", "args": ["report", str(out)]})
        else:
            plan.append({"id": f"{point}:killed", "point": point, "k": k, "args": args, "snapshot": str(out)})
            plan.append({"id": f"{point}:again", "args": [*args, "--resume"]})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(TESTS_DIR), os.environ.get("PYTHONPATH")] if p)}
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), json.dumps(plan)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    status = {r["id"]: r["status"] for r in lines if "status" in r}
    runs = {r["id"]: r for r in lines if "exit" in r}
    assert status["full"] == 0 and runs["full"]["exit"] == 0, runs.get("full")
    want = load_file(str(tmp_path / "full" / "patch.safetensors"))
    for point, k in moments:
        out = tmp_path / f"{point}-{k}"
        assert status[f"{point}:killed"] == -signal.SIGKILL, (point, k, runs.get(f"{point}:killed"))
        left = out.with_name(out.name + ".after-kill")
        _every_file_parses(left)  # what the kill left, as it left it
        # The killed process held the run directory: its lock file and holder are left, its lock is not.
        holder = json.loads((left / LOCK_HOLDER).read_text())
        assert (left / LOCK).exists() and holder["command"] == ("report" if point == "report_write" else "repair")
        if point == "log_line":
            assert not (left / "train_log.jsonl").read_text().endswith("\n")  # the kill did tear a line
        if point == "report_write":
            assert not (left / "report.html").exists()
        again = runs[f"{point}:again"]
        assert status[f"{point}:again"] == 0 and again["exit"] == 0, (point, k, again)
        _every_file_parses(out)
        got = load_file(str(out / "patch.safetensors"))
        assert got.keys() == want.keys() and all(got[n].equal(want[n]) for n in want), (point, k)
        record = RunDir(out).record()
        assert record.training.final_loss is not None and record.training.seconds > 0
        if (left / "checkpoints" / "last.pt").is_file():  # the seconds before the kill still count
            assert record.training.seconds > checkpoint.load(left)["seconds"] > 0, (point, k)
        assert [e["step"] for e in read_train_log(out)] == list(range(1, STEPS + 1))
        assert not list(out.rglob("*.tmp")), (point, k, list(out.rglob("*.tmp")))  # the rewrite removed them
        assert not (out / LOCK).exists() and not (out / LOCK_HOLDER).exists()  # the next run took it, then let go
        if point == "report_write":
            assert "<html" in (out / "report.html").read_text() and (out / "report.md").read_text().strip()
