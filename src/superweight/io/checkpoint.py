"""Training checkpoints and the train log of a run directory: written atomically, read as data only.

    clear(run_dir)                                   # a fresh run: no log or checkpoint of an earlier one
    state = restore(run_dir, vectors, opt, expect)   # resume: step 0 when no checkpoint was made yet
    log_step(run_dir, {"step": 7, "loss": 0.3, "lr": 0.1, "seconds": 1.2})
    read_train_log(run_dir)                          # its entries; a torn last line is dropped
    save(run_dir, 7, vectors, opt, expect, seconds=1.2, loss=0.3)   # atomic

`checkpoints/last.pt` is read with `torch.load(weights_only=True)`: tensors, numbers, strings, lists and
dicts only, so a crafted file cannot run code (it is refused in one line). The checkpoint holds everything a
resume needs besides the data, whose order is a pure function of (seed, step): the patch vectors, optimiser
state, torch's RNG state, the step, the training seconds so far and the last loss, plus the settings, rows and
ablated weights it was made for (a resume with other ones is refused).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from superweight.engine.config import upgrade_config
from superweight.errors import SuperweightError, UsageError
from superweight.io.files import write_atomic
from superweight.io.rundir import CHECKPOINT, TRAIN_LOG

# key -> the type a readable checkpoint holds there ("seconds" and "loss" are absent in older ones).
REQUIRED = {"step": int, "vectors": list, "optimizer": dict, "rng": torch.Tensor, "config": dict, "rows": list,
            "coords": list}


@dataclass
class Resumed:
    """Where training continues: the step, the training seconds spent so far and the last loss."""

    step: int = 0
    seconds: float = 0.0
    loss: float | None = None
    check: dict | None = None  # the held-out check's state (best patch, backoffs), when the run kept one


def clear(run_dir: Path) -> None:
    """Remove the log and checkpoint of an earlier run in `run_dir` (a fresh run keeps nothing of it)."""
    (run_dir / TRAIN_LOG).unlink(missing_ok=True)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)


def save(run_dir: Path, step: int, vectors, optimizer: torch.optim.Optimizer, expect: dict, seconds: float,
         loss: float, check: dict | None = None) -> None:
    """Write checkpoints/last.pt atomically. `expect` holds config, rows and coords (see `restore`); `check`
    the held-out check's state (plain data and tensors)."""
    state = {"step": step, "vectors": [v.detach().cpu().clone() for v in vectors], "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state(), "seconds": seconds, "loss": loss, **expect}
    if check is not None:
        state["check"] = check
    write_atomic(run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load(run_dir: Path) -> dict | None:
    """The checkpoint's contents, None when there is none; a damaged or unsafe file is one error line."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SuperweightError(f"{path} holds objects other than tensors and plain data; refused (loading it "
                               "could run code). Delete it to restart the run from step 0") from None
    except Exception as exc:  # truncated, not a torch file, unreadable: all mean the same to the user
        raise SuperweightError(f"{path} is damaged ({_first_line(exc)}); delete it to restart the run from "
                               "step 0") from None
    if not isinstance(state, dict):
        raise SuperweightError(f"{path} is not a superweight checkpoint (no dict of training state)")
    bad = [k for k, kind in REQUIRED.items() if not isinstance(state.get(k), kind)]
    if bad:
        raise SuperweightError(f"{path} is not a complete checkpoint: missing or malformed {', '.join(bad)}")
    return state


def restore(run_dir: Path, vectors, optimizer: torch.optim.Optimizer, expect: dict) -> Resumed:
    """Load the checkpoint into `vectors` (in place), `optimizer` and torch's RNG, and cut the log back to
    it. Without a checkpoint (a run stopped before its first one) training starts again from step 0.

    `expect` = {"config": ..., "rows": ..., "coords": ...} (and "exclude", the excluded columns per row, when
    there are any): a checkpoint made for other ones is refused."""
    state = load(run_dir)
    if state is None:
        clear(run_dir)
        return Resumed()
    path = run_dir / CHECKPOINT
    if upgrade_config(state["config"]) != expect["config"]:  # checkpoints before the union held a flat config
        raise UsageError("the checkpoint was made with other training settings; resume with the same options")
    if state["rows"] != expect["rows"] or state["coords"] != expect["coords"]:
        raise UsageError("the checkpoint was made for other patch rows or ablated weights; resume with the same ones")
    if state.get("exclude") != expect.get("exclude"):
        raise UsageError("the checkpoint was made with other excluded columns; resume with the same --exclude")
    saved = state["vectors"]
    if len(saved) != len(vectors) or any(s.shape != v.shape for s, v in zip(saved, vectors)):
        raise SuperweightError(f"{path} holds patch vectors of other shapes than this model's rows")
    try:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise SuperweightError(f"{path} has a damaged optimiser or RNG state ({_first_line(exc)})") from None
    with torch.no_grad():
        for v, s in zip(vectors, saved):
            v.copy_(s)
    kept = truncate_log(run_dir, state["step"])
    loss = state.get("loss")
    if loss is None and kept:
        loss = kept[-1].get("loss")  # checkpoints written before the loss was stored
    check = state.get("check") if isinstance(state.get("check"), dict) else None
    return Resumed(step=state["step"], seconds=float(state.get("seconds", 0.0)), loss=loss, check=check)


def log_step(run_dir: Path, entry: dict) -> None:
    """Append one step's line to train_log.jsonl."""
    path = run_dir / TRAIN_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, allow_nan=False) + "\n")


def read_train_log(run_dir: str | Path) -> list[dict]:
    """The train log's entries ({step, loss, lr, seconds}); [] when there is none."""
    path = Path(run_dir) / TRAIN_LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves half a last line; the curve without it is still right
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and "loss" in entry:
            out.append(entry)
    return out


def truncate_log(run_dir: Path, step: int) -> list[dict]:
    """Keep the log lines up to `step` (the checkpoint a run resumes from), so the log matches the patch."""
    kept = [e for e in read_train_log(run_dir) if e["step"] <= step]  # a torn last line is dropped
    path = run_dir / TRAIN_LOG
    if path.exists() or kept:
        text = "".join(json.dumps(e) + "\n" for e in kept)
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return kept


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
