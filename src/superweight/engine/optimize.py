"""The two optimisers of the repair engine, behind one budget (`cfg.budget`: loss evaluations).

    fit = Fit(objective, n, cfg, log, check)     # what either works on (engine/train.py builds it)
    loss, spent = first_order(fit, opt, start, loss, saver)   # cfg: FirstOrderConfig; spent = cfg.steps
    loss, spent = lbfgs(fit, opt, start)              # cfg: LbfgsConfig; spent <= cfg.max_evals

First-order (sgd, adam, adamw): one step per fresh batch, one loss evaluation each, with the lr schedule and
warm-up; the held-out check every steps/8 steps backs off on harm (back to the best patch, lr 5x smaller, at most
MAX_BACKOFFS times). L-BFGS: a strong-Wolfe line search on a fixed set of batch_size sequences (the objective does
not change between trials, so a line search means something), stopped by the budget, by `progress_tol` (the
progress rule, `stalled`) or where torch's L-BFGS converges; a cached closure makes the progress checks free,
and a first step at the config's lr is kept only where it does as well as lr 1 (`_first_lr`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from superweight.engine.config import FirstOrderConfig, LbfgsConfig
from superweight.engine.objective import Distillation, HeldOutCheck
from superweight.errors import SuperweightError

TOLERANCE_CHANGE = 1e-6  # lbfgs: converged once an iteration moves the loss (or a parameter) less than this
MAX_BACKOFFS = 6  # then training stops with the best patch checked (lr down by 5^6 ~ 15,600x)
PROGRESS_WINDOW = 8  # lbfgs: loss evaluations over which `progress_tol` asks for progress
CHUNK = 1  # lbfgs: iterations between two progress checks (the cache makes a check free)


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


@dataclass
class Fit:
    """What an optimiser works on: the objective, the n training sequences it draws batches from (the held-out
    ones come after them), the settings, the log (called per loss evaluation: step, loss, lr), the held-out check
    (or None) and a sparse objective (or None: stages/sparsify.py; first-order only)."""

    objective: Distillation
    n: int
    cfg: LbfgsConfig | FirstOrderConfig
    log: object
    check: HeldOutCheck | None = None
    sparse: object = None


def make_optimizer(params, cfg: LbfgsConfig | FirstOrderConfig, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    lr = cfg.lr * lr_scale
    if cfg.optimizer == "lbfgs":
        # max_eval bounds the loss evaluations (line-search trials included) to the budget; the tolerances stop it
        # early once the loss no longer moves.
        return torch.optim.LBFGS(params, lr=lr, max_iter=cfg.max_evals, max_eval=cfg.max_evals, history_size=20,
                                 line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=TOLERANCE_CHANGE)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: FirstOrderConfig) -> float:
    """The scheduled lr of a first-order step (linear warm-up, then constant or cosine decay to 0)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return cfg.lr * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())
    return cfg.lr


def first_order(fit: Fit, opt, start: int, loss_value, saver):
    """SGD / Adam(W) steps `start`..cfg.steps on fresh batches; the held-out check every steps/8 steps backs off on
    harm. `saver.periodic(step, opt, loss)` (or None: no run directory) checkpoints every few steps. Returns
    (last loss, steps run)."""
    objective, cfg, log, sparse, check = fit.objective, fit.cfg, fit.log, fit.sparse, fit.check
    dp, patch, teacher = objective.dp, objective.patch, objective.teacher
    check_every = max(1, cfg.steps // 8)
    lr_scale = check.state["lr_scale"] if check else 1.0
    for step in range(start, cfg.steps):
        batch = teacher(dp.shard(batch_indices(step, cfg.batch_size, fit.n, cfg.seed)))
        lr = lr_at(step, cfg) * lr_scale
        for group in opt.param_groups:
            group["lr"] = lr
        loss = objective.loss(batch)
        if sparse:
            loss = loss + sparse.penalty(patch) / dp.world
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dp.all_reduce_grads(patch.parameters())
        opt.step()
        if sparse:
            sparse.after_step(patch, lr)
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
                opt = make_optimizer(patch.parameters(), cfg, lr_scale)  # momentum from the harmful steps is dropped
        log(step + 1, loss_value, lr)
        if saver is not None and step + 1 < cfg.steps:
            saver.periodic(step + 1, opt, loss_value)
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


def stalled(evals: list[float], tol: float, window: int = PROGRESS_WINDOW) -> bool:
    """True when the last `window` evaluations lowered the best loss by less than a fraction `tol` of the first
    loss (the damage the ablation does on the training sequences, with no patch yet), 0: never. The stop rule of
    `lbfgs`: relative to the damage, so it means the same at any loss scale, and a loss creeping toward 0 (a
    repair that is done) stops as surely as one creeping toward a floor (one that cannot do more)."""
    if tol <= 0 or len(evals) <= window:
        return False
    return min(evals[:-window]) - min(evals[-window:]) < tol * evals[0]


def done(evals: list[float], tol: float) -> bool:
    """True when the best loss is at most a fraction `tol` of the first (0: never): the patch has removed all but
    that share of the damage on its sequences, and further evaluations could add at most that much."""
    return tol > 0 and len(evals) > 1 and min(evals) <= tol * evals[0]


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


class _Spent(Exception):
    """The budget's last loss evaluation is spent (torch's line search checks `max_eval` only between steps)."""


def lbfgs(fit: Fit, opt, start: int = 0):
    """L-BFGS on a fixed set of batch_size sequences, two at a time: cfg.max_evals loss evaluations at most, and
    with `progress_tol` it stops once the best loss fell by less than that fraction over the last PROGRESS_WINDOW
    evaluations (stalled), checked every CHUNK iterations; it also stops where torch's L-BFGS converges (the loss
    moves less than 1e-6). opt.step runs once for the first step (its lr chosen by `_first_lr`), then once per
    chunk. Nothing here is random, so a run resumed before its end trains again from the start, to the same
    patch; one resumed at `start` >= max_evals (its checkpoint is the end's) trains no more. max_evals is a hard
    cap: a line search that would pass it stops there, and the patch is then the best point evaluated. Returns
    (last loss, evaluations spent)."""
    objective, cfg, log = fit.objective, fit.cfg, fit.log
    if start >= cfg.max_evals:
        return None, start
    dp, teacher, patch = objective.dp, objective.teacher, objective.patch
    sequences = dp.shard(list(epoch_order(fit.n, cfg.seed, 0)[: cfg.batch_size]))
    chunks = [sequences[i : i + 2] for i in range(0, len(sequences), 2)]
    tokens = dp.sum(sum(teacher.mask[c].sum() for c in chunks).to(torch.float64)).item()
    evals, best = [], {}

    def evaluate():
        if len(evals) >= cfg.max_evals:
            raise _Spent
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for c in chunks:
            batch = teacher(c)
            loss = teacher.loss(batch, objective.ablation, patch) * (float(batch[1].sum()) / tokens)
            loss.backward()
            total += loss.detach().double().cpu()
        dp.all_reduce_grads(patch.parameters())
        value = dp.sum(total).item()
        evals.append(value)
        if math.isfinite(value) and value <= best.get("loss", math.inf):
            best.update(loss=value, at=[p.detach().clone() for p in group["params"]])
        log(len(evals), value, cfg.lr)
        return torch.tensor(value if math.isfinite(value) else float("inf"))

    group = opt.param_groups[0]
    closure = _Cached(evaluate, group["params"])
    # lr scales the first step only (along -gradient, where nothing else sets the scale); from the second
    # iteration on the quasi-Newton step, which the curvature pairs scale, is tried first (lr 1). A first step
    # far off can still land in another basin (lr 100: 92.6% KL) or stall (lr 0.01: 95.8%), so an lr other than
    # 1 is tried beside lr 1 and kept only where it lowers the loss as much (three evaluations more: the
    # gradient at the start and one trial each).
    try:
        group.update(lr=_first_lr(closure, group["params"], cfg.lr), max_iter=1, max_eval=cfg.max_evals - len(evals))
        opt.step(closure)
        state = opt.state[group["params"][0]]
        while ((left := cfg.max_evals - len(evals) - 1) > 0 and not stalled(evals, cfg.progress_tol)
               and not done(evals, cfg.done_tol)):
            iters, calls, before = state.get("n_iter", 0), state.get("func_evals", 0), len(evals)
            group.update(lr=1.0, max_iter=CHUNK, max_eval=left)
            start_loss = float(opt.step(closure))
            moved = abs(float(closure()) - start_loss) >= TOLERANCE_CHANGE  # closure(): the cached accepted point
            if not moved or len(evals) == before or (
                    state["n_iter"] - iters < CHUNK and state["func_evals"] - calls < left):
                break  # converged: the loss stopped moving, or torch stopped before the chunk ran out
    except _Spent:  # stopped inside a line search, the parameters at its last trial: back to the best point
        if not best:  # no finite loss at all: nothing better to go back to
            return evals[-1], len(evals)
        with torch.no_grad():
            for p, x in zip(group["params"], best["at"]):
                p.copy_(x)
        return best["loss"], len(evals)
    return evals[-1], len(evals)
