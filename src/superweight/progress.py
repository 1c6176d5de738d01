"""The one progress protocol every stage reports through: a named stage with an optional total, then ticks.

    class Bar:                                   # anything with these two methods will do
        def stage(self, name, total=None): ...   # a new stage: "Training patch", 32 steps
        def advance(self, n=1, loss=None): ...   # n more done (tokens, steps); a training step's loss
    run_repair(loaded, coords, rows, out, job, progress=Bar())

The CLI draws it as one rich progress bar (cli/common.progress_bar); the library and the notebook API pass
nothing, which is `SILENT`. `Prefixed` names the stages of a job inside another (the pipeline's "Detect: ...").
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """What a long job tells whoever watches it."""

    def stage(self, name: str, total: int | None = None) -> None:
        """A new stage begins: its name and how many units it has (None: unknown)."""

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        """`n` more units of the current stage are done; a training step also gives its `loss`."""


class Silent:
    """Progress that goes nowhere (the default)."""

    def stage(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        pass


SILENT = Silent()


class Prefixed:
    """Another Progress, with every stage name prefixed ("Detect: Scanning spikes")."""

    def __init__(self, inner: Progress, prefix: str):
        self.inner, self.prefix = inner, prefix

    def stage(self, name: str, total: int | None = None) -> None:
        self.inner.stage(self.prefix + name, total)

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        self.inner.advance(n, loss)


def or_silent(progress: Progress | None) -> Progress:
    return SILENT if progress is None else progress


class EachStep:
    """Progress that calls `fn(step, loss)` once per unit advanced, counting from 1 (a training run's steps):

        train(model, coords, rows, seqs, cfg, Track(progress=EachStep(lambda step, loss: print(step, loss))))
    """

    def __init__(self, fn):
        self.fn, self.step = fn, 0

    def stage(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        for _ in range(n):
            self.step += 1
            self.fn(self.step, loss)
