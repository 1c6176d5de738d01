"""The cost account of a job: seconds and model work per stage (core/cost.Ledger), in eval-pass equivalents.

    stages = Stages(loaded.model)
    with stages.ledger:
        with stages("repair"): ...                 # timed and counted under "repair"
    record.cost = stages.account(Stages.eval_feed(loaded, record, 2048))

`run` (stages/pipeline.py) counts each of its stages this way. A stage run on its own (`superweight repair`,
`analyze`) counts itself with `own_account`, which does nothing when an outer account already counts (inside `run`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from superweight.core.cost import Ledger, counting
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.schema.record import CostAccount, RunRecord, StageCost


class Stages:
    """Seconds and model work of each stage of a run: `with stages("repair"): ...` times the block and counts
    its passes (core/cost.Ledger) under that name, so a stage added to the pipeline is accounted apart by its
    name alone."""

    def __init__(self, model):
        self.ledger = Ledger(model)
        self.timings: dict[str, float] = {}
        self._started: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = self._started[name] = time.perf_counter()
        try:
            with self.ledger.stage(name):
                yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
            del self._started[name]

    @staticmethod
    def eval_feed(loaded: Loaded, record: RunRecord, eval_tokens: int) -> int:
        """Tokens one plain forward pass over the run's eval text feeds (BOS included)."""
        from superweight.measure.metrics import tokens_fed

        pr = record.protocol
        n = corpora.tokenize(loaded.tokenizer, corpora.load_text(pr.corpus, pr.split), eval_tokens).numel()
        return tokens_fed(n, pr.max_length, pr.stride, corpora.Bos.first(pr.bos))

    def account(self, fed: int, before: CostAccount | None = None) -> CostAccount:
        """The counts so far in eval-pass equivalents (one forward pass of `fed` tokens through every layer); a
        stage still running counts its seconds so far. `before`: an account of earlier stages (another command's)
        to keep beside these, in the same unit; a stage counted here again replaces its entry."""
        layers = self.ledger.n_layers
        unit = max(fed * layers, 1)

        def parts(count, prefix=""):
            out = {}
            for name, c in count.parts.items():
                out[prefix + name] = (c.forward + c.backward) / unit
                out.update(parts(c, f"{prefix}{name}/"))
            return out

        now = time.perf_counter()
        seconds = self.timings | {name: self.timings.get(name, 0.0) + now - t for name, t in self._started.items()}
        stages = {name: StageCost(forward=c.forward / unit, backward=c.backward / unit,
                                  seconds=seconds.get(name), parts=parts(c))
                  for name, c in self.ledger.counts.items()}
        if before is not None and before.unit == unit:
            stages = {k: v for k, v in before.stages.items() if k not in stages} | stages
        return CostAccount(unit=unit, eval_tokens=fed, layers=layers, stages=stages,
                           total=sum(s.forward + s.backward for s in stages.values()))


@contextlib.contextmanager
def own_account(model, name: str):
    """Count a stage run on its own under `name`: yields its Stages (stamp the record with `account`) or None when
    an outer account already counts it (`run`)."""
    if counting():
        yield None
        return
    stages = Stages(model)
    with stages.ledger, stages(name):
        yield stages


def eval_tokens_of(run_dir: Path, default: int) -> int:
    """The --eval-tokens a run directory's repair was started with (config.json; `default` without one)."""
    from superweight.io.files import read_json
    from superweight.schema.runconfig import RunConfig, parse
    from superweight.io.rundir import CONFIG

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return default
    return parse(RunConfig, read_json(path, "run settings"), str(path)).eval_tokens
