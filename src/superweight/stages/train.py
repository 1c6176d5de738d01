"""The training engine: repair an ablated model with a row patch trained by KL distillation against the intact
model (the training data, the loss, the optimisers, checkpoints). Its settings, `RepairConfig` and the named
`RECIPES`, live in stages/recipes.py; `Track` says where a run's log and checkpoints go and who hears of its steps.

One model copy: the teacher is the model with every intervention off (under no_grad), the student the same
model with the super weights ablated and a `RowPatch` on. The blocks below the first edited layer run once
per batch (teacher pass) and are reused by the student (`prefix.Prefix`). Only the patch vectors train.

    cfg = RECIPES["lbfgs"]                       # stages/recipes.py: RepairConfig and the named recipes
    patch, state = train(model, coords, [(11, 507)], seqs, cfg, Track(Path("runs/x")))   # seqs: [N, T] ids

Two engines. First-order (sgd, adam, adamw): one step per fresh batch. `lbfgs`: L-BFGS with a strong-Wolfe line
search on a fixed set of batch_size rows, where a line search means something (the objective does not change
between trials); `steps` bounds its loss evaluations. Either way the last check_rows rows are held out and
checked (stages/distill.HeldOutCheck): the patch handed over is the best one checked, never worse there than
no patch, and a first-order run whose patch does worse than none goes back to the best one with a 5x smaller lr.

Checkpoints (patch, optimiser, RNG, step, seconds, the check's state; io/checkpoint.py) make a killed run resume
to the same patch, bit for bit on CPU: the data order is a pure function of (seed, step), so no data state needs
saving beyond the step. An lbfgs run (one optimiser call of ~30 s) checkpoints at its end; killed before, it
trains again from the start, to the same patch.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord, split_row
from superweight.core.intervene import Ablation, RowPatch
from superweight.core.prefix import Prefix, first_edited_layer
from superweight.errors import SuperweightError, UsageError
from superweight.io import checkpoint, corpora
from superweight.io.record import Training
from superweight.progress import Progress, or_silent
from superweight.stages import distributed
from superweight.stages.distill import HeldOutCheck, Teacher, kl_loss  # noqa: F401 (kl_loss: re-exported)
from superweight.stages.precondition import PreconditionedPatch, scales
from superweight.stages.recipes import RECIPES, RepairConfig  # noqa: F401 (re-exported: the engine's settings)


def training_sequences(tokenizer, corpus: str, cfg: RepairConfig,
                       bos: corpora.Bos = corpora.NO_BOS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N, T] ids and mask (None when packed): `cfg.data` says how the train split becomes sequences. `bos`
    (io/corpora.Bos): when on, every row starts with its token, followed by T - 1 tokens of text."""
    if cfg.data == "lines" and corpus == "wikitext2":
        lines = [ln for ln in corpora.load_text(corpus, "train[:2%]").split("\n") if ln.strip()]
        head = [bos.token] if bos.on else []
        rows = [(head + tokenizer(ln, add_special_tokens=False)["input_ids"])[: cfg.seq_len] for ln in lines]
        rows = [r for r in rows if len(r) >= 2]
        ids = torch.full((len(rows), cfg.seq_len), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask
    ids = corpora.tokenize(tokenizer, corpora.load_text(corpus, "train"), cfg.train_tokens)
    return corpora.pack(ids, cfg.seq_len, bos), None


@functools.lru_cache(maxsize=64)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of the n sequences in one epoch: a seeded permutation, cached (every step of an epoch asks)."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The sequence indices of one step: a fresh seeded permutation per epoch, a pure function of the step."""
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(g, n)
        out.append(epoch_order(n, seed, epoch)[j])
    return out


TOLERANCE_CHANGE = 1e-6  # lbfgs: converged once an iteration moves the loss (or a parameter) less than this
MAX_BACKOFFS = 6  # then training stops with the best patch checked (lr down by 5^6 ~ 15,600x)


def _optimizer(params, cfg: RepairConfig, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    lr = cfg.lr * lr_scale
    if cfg.optimizer == "lbfgs":
        # max_eval bounds the loss evaluations (line-search trials included) to the step budget; the tolerances
        # stop it early once the loss no longer moves.
        return torch.optim.LBFGS(params, lr=lr, max_iter=cfg.steps, max_eval=cfg.steps, history_size=20,
                                 line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=TOLERANCE_CHANGE)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def _lr(step: int, cfg: RepairConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return cfg.lr * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())
    return cfg.lr


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
    rows: list[tuple[int, int]],
    data: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None],
    cfg: RepairConfig,
    track: Track | None = None,
    objective=None,
    exclude: list[list[int]] | None = None,
) -> tuple[RowPatch, Training]:
    """Train patch vectors on `rows` so the model with `coords` ablated imitates the intact model.

    `data`: [N, T] token ids (packed), or (ids, mask) as training_sequences returns them, with the mask [N, T]
    marking real tokens of right-padded rows (None: every token is real).
    `track` (Track) says where the train log and checkpoints go and who hears of each step.
    `objective` (a `sparsify` objective) builds the patch (from its `init` vectors when it has them), adds its
    penalty to the loss and acts after each step (no checkpoints then: `track.run_dir` must be None).
    `exclude`: per row, the columns of d held at exactly 0 throughout (stages/exclusion.py resolves them).
    """
    track = track or Track()
    run_dir, resume = track.run_dir, track.resume
    init_vectors = getattr(objective, "init", None)
    if objective is not None and run_dir is not None:
        raise ValueError("sparse objectives train without a run directory")
    if objective is not None and cfg.optimizer == "lbfgs":
        raise UsageError("sparse objectives train with a first-order optimiser (sgd, adam, adamw), not lbfgs")
    dp = distributed.current()  # one process, or this one's share under `accelerate launch`
    sequences, mask = data if isinstance(data, tuple) else (data, None)
    if mask is None:
        mask = torch.ones_like(sequences)
    # The last check_rows rows are held out (never trained on) when enough remain to train on.
    n_check = cfg.check_rows if objective is None and sequences.shape[0] > cfg.check_rows + 1 else 0
    n = sequences.shape[0] - n_check
    torch.manual_seed(cfg.seed)
    ablation = Ablation(model, coords)
    sizes = [down_projection(model, layer, expert).d_ff for layer, _, expert in map(split_row, rows)]
    init = [torch.zeros(f) if cfg.init == "zero" else torch.randn(f) * 1e-3 for f in sizes]
    init = init_vectors if init_vectors is not None else init
    p = scales(model, rows, cfg.space)
    patch = objective.patch(model, rows, init, p) if objective else PreconditionedPatch(model, rows, p, init)
    patch.exclude(exclude)
    rows_key, coords_key = [list(r) for r in patch.rows], [str(c) for c in coords]
    expect = {"config": cfg.model_dump(), "rows": rows_key, "coords": coords_key}
    if any(exclude or []):  # only then, so that checkpoints of runs without one stay as they were
        expect["exclude"] = [sorted(c) for c in exclude]
    resumed = checkpoint.Resumed()
    opt = _optimizer(patch.parameters(), cfg)
    if resume:
        if run_dir is None:
            raise UsageError("nothing to resume: no run directory given")
        resumed = checkpoint.restore(run_dir, patch.vectors, opt, expect)  # step 0 before the first checkpoint
    elif run_dir is not None:  # a fresh run: nothing of an earlier run in this directory may survive
        checkpoint.clear(run_dir)
    start = resumed.step
    prefix = Prefix(model, first_edited_layer(coords, rows))
    vocab = model.get_output_embeddings().weight.shape[0]
    # Teacher log-probs are fixed: keep them (fp16, ~0.01 nats of rounding) when the whole training set
    # fits the budget and will be seen more than once.
    seen = cfg.batch_size if cfg.optimizer == "lbfgs" else n
    cache_fits = seen * sequences.shape[1] * vocab * 2 <= cfg.teacher_cache_mb * 2**20 and cfg.steps * cfg.batch_size > seen
    teacher = Teacher(model, prefix, sequences, mask, cfg, cache_fits)
    check = None
    if n_check:
        check = HeldOutCheck(Teacher(model, prefix, sequences, mask, cfg, True), list(range(n, n + n_check)),
                             ablation, patch, prefix, cfg, resumed.check)
    t0 = time.perf_counter()
    elapsed = lambda: resumed.seconds + time.perf_counter() - t0  # noqa: E731 (across resumes)
    log = _Log(run_dir, or_silent(track.progress), elapsed)
    job = _Job(model, teacher, dp, n, ablation, patch, prefix, cfg, log, objective, check)
    if cfg.optimizer == "lbfgs":
        loss_value, done = _lbfgs(job, opt, start)
    else:
        saver = functools.partial(checkpoint.save, run_dir) if run_dir is not None else None
        loss_value, done = _first_order(job, opt, start, resumed.loss, (saver, track.checkpoint_every, expect))
    if check is not None:
        if cfg.optimizer == "lbfgs":
            check.update(done)
        check.restore_best()  # the patch handed over: the best one checked
    if run_dir is not None:
        checkpoint.save(run_dir, done, patch.vectors, opt, expect, elapsed(), loss_value,
                        check.state if check else None)
    seconds = elapsed()
    if objective is None:  # the result is in weight units, whatever coordinates training used (excluded: 0)
        patch = RowPatch(model, patch.rows, patch.weights())
    for v in patch.parameters():
        v.requires_grad_(False)
    return patch, Training(
        steps=done, seconds=seconds, s_per_step=seconds / max(done, 1), final_loss=loss_value,
        resumed_from=start if resume else None, teacher_cached=cache_fits, check=check.record() if check else None,
    )


class _Log:
    """One line of train_log.jsonl and one progress tick per step (or loss evaluation)."""

    def __init__(self, run_dir, progress: Progress, elapsed):
        self.run_dir, self.progress, self.elapsed = run_dir, progress, elapsed

    def __call__(self, step: int, loss: float, lr: float) -> None:
        if self.run_dir is not None:
            checkpoint.log_step(self.run_dir, {"step": step, "loss": loss, "lr": lr, "seconds": round(self.elapsed(), 3)})
        self.progress.advance(1, loss)


@dataclass
class _Job:
    """What both engines work on: the model, the teacher's targets, the data-parallel share, the training rows,
    the ablation and patch, the shared prefix, the settings, the log, a sparse objective (or None) and the
    held-out check (or None)."""

    model: nn.Module
    teacher: Teacher
    dp: distributed.DataParallel
    n: int
    ablation: Ablation
    patch: RowPatch
    prefix: Prefix
    cfg: RepairConfig
    log: _Log
    objective: object = None
    check: HeldOutCheck | None = None


def _student_loss(job: _Job, batch):
    return job.dp.share_of_mean(job.teacher.loss(batch, job.ablation, job.patch), batch[1])


def _first_order(job: _Job, opt, start: int, loss_value, saving):
    """SGD / Adam(W) steps on fresh batches; the held-out check every steps/8 steps backs off on harm. `saving`:
    (save(step, vectors, opt, expect, seconds, loss, check state) or None, every K steps, what must match)."""
    dp, patch, cfg, log, objective, check = job.dp, job.patch, job.cfg, job.log, job.objective, job.check
    save, checkpoint_every, expect = saving
    check_every = max(1, cfg.steps // 8)
    lr_scale = check.state["lr_scale"] if check else 1.0
    for step in range(start, cfg.steps):
        batch = job.teacher(dp.shard(batch_indices(step, cfg.batch_size, job.n, cfg.seed)))
        lr = _lr(step, cfg) * lr_scale
        for group in opt.param_groups:
            group["lr"] = lr
        loss = _student_loss(job, batch)
        if objective:
            loss = loss + objective.penalty(patch) / dp.world
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dp.all_reduce_grads(patch.parameters())
        opt.step()
        if objective:
            objective.after_step(patch, lr)
        loss_value = dp.sum(loss.detach()).item()
        diverged = not math.isfinite(loss_value)
        if diverged and check is None:
            raise SuperweightError(f"training diverged at step {step + 1} (loss {loss_value}): try a lower --lr")
        if check is not None and (diverged or (step + 1) % check_every == 0 or step + 1 == cfg.steps):
            if check.update(step + 1, diverged):
                if check.state["backoffs"] > MAX_BACKOFFS:
                    log(step + 1, loss_value, lr)
                    return loss_value, step + 1
                lr_scale = check.state["lr_scale"]
                opt = _optimizer(patch.parameters(), cfg, lr_scale)  # momentum from the harmful steps is dropped
        log(step + 1, loss_value, lr)
        if save is not None and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            save(step + 1, patch.vectors, opt, expect, log.elapsed(), loss_value, check.state if check else None)
    return loss_value, cfg.steps


def _first_lr(closure, params, lr: float) -> float:
    """`lr` when a first step of lr t along -gradient (t = min(1, 1/‖g‖₁), torch's first L-BFGS step) lowers the
    loss at least as much as the step at lr 1, else 1; the parameters are left where they were."""
    if lr == 1.0:
        return lr
    closure()
    start = [p.detach().clone() for p in params]
    grads = [p.grad.detach().clone() for p in params]
    g1 = sum(g.abs().sum() for g in grads).item()
    t = min(1.0, 1.0 / g1) if g1 > 0 else 1.0
    loss = {}
    with torch.no_grad():
        for f in (lr, 1.0):
            for p, x, g in zip(params, start, grads):
                p.copy_(x - f * t * g)
            with torch.enable_grad():
                loss[f] = closure().item()
        for p, x in zip(params, start):
            p.copy_(x)
    return lr if loss[lr] <= loss[1.0] else 1.0


PROGRESS_WINDOW = 8  # lbfgs: loss evaluations over which `progress_tol` asks for progress
CHUNK = 1  # lbfgs: iterations between two progress checks (the cache makes a check free)


def stalled(evals: list[float], tol: float, window: int = PROGRESS_WINDOW) -> bool:
    """True when the last `window` evaluations lowered the best loss by less than a fraction `tol` of the first
    loss (the damage the ablation does on the training rows, with no patch yet), 0: never. The stop rule of
    `lbfgs`: relative to the damage, so it means the same at any loss scale, and a loss creeping toward 0 (a
    repair that is done) stops as surely as one creeping toward a floor (one that cannot do more)."""
    if tol <= 0 or len(evals) <= window:
        return False
    return min(evals[:-window]) - min(evals[-window:]) < tol * evals[0]


class _Cached:
    """A closure that evaluates each point once: torch's L-BFGS starts every step() with an evaluation of the
    point its last line search accepted, which the chunked optimisation below would otherwise pay again."""

    def __init__(self, closure, params, size: int = 32):
        self.closure, self.params, self.size, self.seen = closure, params, size, {}

    def __call__(self):
        key = b"".join(p.detach().cpu().numpy().tobytes() for p in self.params)
        if key in self.seen:
            loss, grads = self.seen[key]
            for p, g in zip(self.params, grads):
                p.grad = g.clone()
            return loss
        loss = self.closure()
        self.seen[key] = (loss, [p.grad.detach().clone() for p in self.params])
        if len(self.seen) > self.size:
            self.seen.pop(next(iter(self.seen)))
        return loss


def _lbfgs(job: _Job, opt, start: int):
    """L-BFGS on a fixed set of batch_size rows, two at a time: `steps` loss evaluations at most, and with
    `progress_tol` it stops once the best loss fell by less than that fraction over the last PROGRESS_WINDOW
    evaluations (stalled), checked every CHUNK iterations; it also stops where torch's L-BFGS converges (the
    loss moves less than 1e-6). A run resumed before its end trains again from the start (the same patch:
    nothing here is random)."""
    model, teacher, dp, n, ablation, patch, prefix, cfg, log = (
        job.model, job.teacher, job.dp, job.n, job.ablation, job.patch, job.prefix, job.cfg, job.log)
    if start >= cfg.steps:
        return None, start
    rows = dp.shard(list(epoch_order(n, cfg.seed, 0)[: cfg.batch_size]))
    chunks = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    tokens = dp.sum(sum(teacher.mask[c].sum() for c in chunks).to(torch.float64)).item()
    evals = []

    def evaluate():
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for c in chunks:
            batch = teacher(c)
            loss = teacher.loss(batch, ablation, patch) * (float(batch[1].sum()) / tokens)
            loss.backward()
            total += loss.detach().double().cpu()
        dp.all_reduce_grads(patch.parameters())
        value = dp.sum(total).item()
        evals.append(value)
        log(len(evals), value, cfg.lr)
        return torch.tensor(value if math.isfinite(value) else float("inf"))

    group = opt.param_groups[0]
    closure = _Cached(evaluate, group["params"])
    # lr scales the first step only (along -gradient, where nothing else sets the scale); from the second
    # iteration on the quasi-Newton step, which the curvature pairs scale, is tried first (lr 1). A first step
    # far off can still land in another basin (lr 100: 92.6% KL) or stall (lr 0.01: 95.8%), so an lr other than
    # 1 is tried beside lr 1 and kept only where it lowers the loss as much (three evaluations more: the
    # gradient at the start and one trial each).
    group.update(lr=_first_lr(closure, group["params"], cfg.lr), max_iter=1, max_eval=cfg.steps - len(evals))
    opt.step(closure)
    state = opt.state[group["params"][0]]
    while (left := cfg.steps - len(evals) - 1) > 0 and not stalled(evals, cfg.progress_tol):
        iters, calls, before = state.get("n_iter", 0), state.get("func_evals", 0), len(evals)
        group.update(lr=1.0, max_iter=CHUNK, max_eval=left)
        start_loss = float(opt.step(closure))
        moved = abs(float(closure()) - start_loss) >= TOLERANCE_CHANGE  # closure(): the cached accepted point
        if not moved or len(evals) == before or (
                state["n_iter"] - iters < CHUNK and state["func_evals"] - calls < left):
            break  # converged: the loss stopped moving, or torch stopped before the chunk ran out
    return evals[-1], len(evals)
