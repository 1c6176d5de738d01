"""The repair engine's entry point: train a row patch so the ablated model imitates the intact one, by KL
distillation, in three parts: the parametrised patch (engine/patch.py: the space, the mask), the objective
(engine/objective.py: teacher, loss, chunking, held-out check) and the two optimisers behind one budget
(engine/optimize.py). The settings are engine/config.py's; `Track` says where a run's log and checkpoints go and
who hears of its loss evaluations.

    cfg = RECIPES["lbfgs"]                       # engine/config.py: LbfgsConfig | FirstOrderConfig, the recipes
    patch, training = train(model, coords, [(11, 507)], seqs, cfg, Track(Path("runs/x")))   # seqs: [N, T] ids

Either way the last cfg.check_sequences sequences are held out and checked (engine/objective.HeldOutCheck): the
patch handed over is the best one checked, never worse there than no patch.

Checkpoints (patch, optimiser, RNG, step, seconds, the check's state; io/checkpoint.py) make a killed run resume
to the same patch, bit for bit on CPU: the data order is a pure function of (seed, step), so no data state needs
saving beyond the step. A first-order run checkpoints every `checkpoint_every` steps; an lbfgs run (seconds to
a minute) checkpoints at its end only: killed before, it trains again from the start, to the same patch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord, split_row
from superweight.core.intervene import Ablation, RowPatch
from superweight.core.prefix import Prefix, first_edited_layer
from superweight.engine.config import FirstOrderConfig, LbfgsConfig
from superweight.engine.objective import Distillation, HeldOutCheck, Sequences, Teacher
from superweight.engine.optimize import Fit, first_order, lbfgs, make_optimizer
from superweight.engine.patch import SpacePatch, space_units
from superweight.errors import UsageError
from superweight.io import checkpoint, corpora
from superweight.schema.record import Training
from superweight.progress import Progress, or_silent
from superweight.stages import distributed


def training_sequences(tokenizer, corpus: str, cfg: LbfgsConfig | FirstOrderConfig,
                       bos: corpora.Bos = corpora.NO_BOS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N, T] ids and mask (None when packed): `cfg.data` says how the train split becomes sequences. `bos`
    (io/corpora.Bos): when on, every sequence starts with its token, followed by T - 1 tokens of text."""
    if cfg.data == "lines" and corpus == "wikitext2":
        lines = [ln for ln in corpora.load_text(corpus, "train[:2%]").split("\n") if ln.strip()]
        head = [bos.token] if bos.on else []
        seqs = [(head + tokenizer(ln, add_special_tokens=False)["input_ids"])[: cfg.seq_len] for ln in lines]
        seqs = [r for r in seqs if len(r) >= 2]
        ids = torch.full((len(seqs), cfg.seq_len), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(seqs):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask
    ids = corpora.tokenize(tokenizer, corpora.load_text(corpus, "train"), cfg.train_tokens)
    return corpora.pack(ids, cfg.seq_len, bos), None


def training_data(tokenizer, corpus: str, cfg: LbfgsConfig | FirstOrderConfig,
                  bos: corpora.Bos = corpora.NO_BOS, reuse: Sequences | None = None) -> Sequences:
    """training_sequences as a `Sequences` that trainings on it share (the teacher runs once per sequence), keyed
    by what decides them; `reuse` (sequences the caller holds) is returned instead when it has that key."""
    key = (corpus, cfg.data, cfg.seq_len, cfg.train_tokens, bos.token)
    if reuse is not None and reuse.key == key:
        return reuse
    return Sequences(*training_sequences(tokenizer, corpus, cfg, bos), key=key)


@dataclass(frozen=True)
class Track:
    """Where a training run reports: `run_dir` gets train_log.jsonl and checkpoints/last.pt every
    `checkpoint_every` steps (None: nothing is written), `resume` continues from that checkpoint, and `progress`
    hears of each step (stage set by the caller; advance(1, loss) per step or loss evaluation)."""

    run_dir: Path | None = None
    checkpoint_every: int = 25
    resume: bool = False
    progress: Progress | None = None


def train(
    model: nn.Module,
    coords: list[WeightCoord],
    rows: list[tuple[int, ...]],
    data: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None] | Sequences,
    cfg: LbfgsConfig | FirstOrderConfig,
    track: Track | None = None,
    sparse=None,
    exclude: list[list[int]] | None = None,
) -> tuple[RowPatch, Training]:
    """Train patch vectors on `rows` (patch rows: (layer, row[, expert])) so the model with `coords` ablated
    imitates the intact model.

    `data`: [N, T] token ids (packed sequences), or (ids, mask) as training_sequences returns them, with the mask
    [N, T] marking real tokens of right-padded sequences (None: every token is real), or a `Sequences`
    (training_data): trainings handed the same one share the intact model's targets and the check's no-patch KL.
    `track` (Track) says where the train log and checkpoints go and who hears of each loss evaluation.
    `sparse` (a stages/sparsify objective) builds the patch (from its `init` vectors when it has them), adds its
    penalty to the loss and acts after each step (no checkpoints then: `track.run_dir` must be None).
    `exclude`: per row, the columns of d held at exactly 0 throughout (stages/exclusion.py resolves them).
    """
    track = track or Track()
    run_dir, resume = track.run_dir, track.resume
    if sparse is not None and run_dir is not None:
        raise ValueError("sparse objectives train without a run directory")
    if sparse is not None and cfg.optimizer == "lbfgs":
        raise UsageError("sparse objectives train with a first-order optimiser (sgd, adam, adamw), not lbfgs")
    dp = distributed.current()  # one process, or this one's share under `accelerate launch`
    data = data if isinstance(data, Sequences) else Sequences(*data) if isinstance(data, tuple) else Sequences(data)
    sequences, mask = data.ids, data.mask
    if mask is None:
        mask = torch.ones_like(sequences)
    # The last check_sequences sequences are held out (never trained on) when enough remain to train on.
    n_check = data.held_out(cfg.check_sequences) if sparse is None else 0
    n = sequences.shape[0] - n_check
    torch.manual_seed(cfg.seed)
    ablation = Ablation(model, coords)
    patch = _patch(model, rows, cfg, sparse)
    patch.exclude(exclude)
    expect = {"config": cfg.model_dump(), "rows": [list(r) for r in patch.rows], "coords": [str(c) for c in coords]}
    if any(exclude or []):  # only then, so that checkpoints of runs without one stay as they were
        expect["exclude"] = [sorted(c) for c in exclude]
    resumed = checkpoint.Resumed()
    opt = make_optimizer(patch.parameters(), cfg)
    if resume:
        if run_dir is None:
            raise UsageError("nothing to resume: no run directory given")
        resumed = checkpoint.restore(run_dir, patch.vectors, opt, expect)  # step 0 before the first checkpoint
    elif run_dir is not None:  # a fresh run: nothing of an earlier run in this directory may survive
        checkpoint.clear(run_dir)
    prefix = Prefix(model, first_edited_layer(coords, rows))
    vocab = model.get_output_embeddings().weight.shape[0]
    # Teacher log-probs are fixed: keep them (fp16, ~0.01 nats of rounding) when the whole training set
    # fits the budget and will be seen more than once.
    seen = cfg.batch_size if cfg.optimizer == "lbfgs" else n
    cache_fits = seen * sequences.shape[1] * vocab * 2 <= cfg.teacher_cache_mb * 2**20 and cfg.budget * cfg.batch_size > seen
    targets = data.targets_for(prefix.layer, cfg.temperature)
    teacher = Teacher(model, prefix, sequences, mask, cfg, cache_fits, targets)
    check = None
    if n_check:
        check = HeldOutCheck(Teacher(model, prefix, sequences, mask, cfg, True, targets), list(range(n, n + n_check)),
                             ablation, patch, cfg, resumed.check)
    t0 = time.perf_counter()
    elapsed = lambda: resumed.seconds + time.perf_counter() - t0  # noqa: E731 (across resumes)
    log = _Log(run_dir, or_silent(track.progress), elapsed)
    fit = Fit(Distillation(teacher, ablation, patch, dp), n, cfg, log, check, sparse)
    saver = _Saver(run_dir, track.checkpoint_every, expect, patch, elapsed, check) if run_dir is not None else None
    if cfg.optimizer == "lbfgs":
        loss_value, done = lbfgs(fit, opt, resumed.step)
        if check is not None:
            check.update(done, back_off=False)  # no retraining after it: the best patch checked is handed over
    else:
        loss_value, done = first_order(fit, opt, resumed.step, resumed.loss, saver)
    if check is not None:
        check.restore_best()  # the patch handed over: the best one checked
    if saver is not None:
        saver(done, opt, loss_value)
    seconds = elapsed()
    if sparse is None:  # the result is in weight units, whatever space training used (excluded: 0)
        patch = RowPatch(model, patch.rows, patch.weights())
    for v in patch.parameters():
        v.requires_grad_(False)
    return patch, Training(
        steps=done, seconds=seconds, s_per_step=seconds / max(done, 1), final_loss=loss_value,
        resumed_from=resumed.step if resume else None, teacher_cached=cache_fits,
        check=check.record() if check else None,
    )


def _patch(model, rows, cfg, sparse) -> SpacePatch:
    """The patch training starts from, in the config's space: zero (or small random) vectors, or a sparse
    objective's own patch, from its `init` vectors when it has them."""
    sizes = [down_projection(model, layer, expert).d_ff for layer, _, expert in map(split_row, rows)]
    init = [torch.zeros(f) if cfg.init == "zero" else torch.randn(f) * 1e-3 for f in sizes]
    units = space_units(model, rows, cfg.space)
    if sparse is not None:
        return sparse.patch(model, rows, sparse.init if sparse.init is not None else init, units)
    return SpacePatch(model, rows, units, init)


class _Log:
    """One line of train_log.jsonl and one progress tick per loss evaluation (a first-order step is one)."""

    def __init__(self, run_dir, progress: Progress, elapsed):
        self.run_dir, self.progress, self.elapsed = run_dir, progress, elapsed

    def __call__(self, step: int, loss: float, lr: float) -> None:
        if self.run_dir is not None:
            checkpoint.log_step(self.run_dir, {"step": step, "loss": loss, "lr": lr, "seconds": round(self.elapsed(), 3)})
        self.progress.advance(1, loss)


class _Saver:
    """The checkpoints of one run in `run_dir`: `saver(step, opt, loss)` writes checkpoints/last.pt with the patch,
    the optimiser, the seconds so far and the check's state, made for `expect` (settings, rows, ablated weights);
    `saver.periodic(...)` does so every `every` steps."""

    def __init__(self, run_dir: Path, every: int, expect: dict, patch, elapsed, check: HeldOutCheck | None):
        self.run_dir, self.every, self.expect, self.patch, self.elapsed, self.check = (
            run_dir, every, expect, patch, elapsed, check)

    def periodic(self, step: int, opt, loss: float) -> None:
        if step % self.every == 0:
            self(step, opt, loss)

    def __call__(self, step: int, opt, loss: float | None) -> None:
        checkpoint.save(self.run_dir, step, self.patch.vectors, opt, self.expect, self.elapsed(), loss,
                        self.check.state if self.check else None)
