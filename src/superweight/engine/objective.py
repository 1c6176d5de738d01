"""The distillation objective: the loss against the intact model, the teacher's targets, and the held-out check.

    teacher = Teacher(model, prefix, sequences, mask, cfg, keep=True)
    ids, m, teacher_lp, hidden = teacher([0, 1])       # sequences 0 and 1: intact log-probs and prefix states
    objective = Distillation(teacher, ablation, patch, dp)
    loss = objective.loss(teacher([2, 3]))              # this process's share of the batch's mean KL
    check = HeldOutCheck(teacher, [30, 31], ablation, patch, cfg, state=None)
    check.update(step)                                  # True: worse than no patch, the best patch is back

One model copy: the teacher is the model with every intervention off (under no_grad), the student the same
model with the super weights ablated and the patch on; the blocks below the first edited layer run once per
batch (teacher pass) and are reused by the student (core/prefix.Prefix). Log-softmax and KL run in fp32, over
chunks of tokens when the vocabulary is large (core/head.CHUNK_BUDGET).

Trainings on the same `Sequences` (a repair's patch, its other-row control and seeds, `run`'s second repair, the
compensation frontier's points) share the teacher's kept targets and the check's no-patch KL: the intact model
runs once per sequence, not once per training.

The check is what makes a repair never worse than no patch: its first value is the ablated model's own KL on
sequences that training never sees, a patch is kept only when it beats every one checked before, and a patch
that does worse than none sends first-order training back to the best one (engine/optimize.py then cuts the
lr 5x).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from torch.utils.checkpoint import checkpoint

from superweight.core.arch import input_device
from superweight.core.head import CHUNK_BUDGET, Head, chunk_tokens, head_of, trunk
from superweight.core.prefix import Prefix
from superweight.schema.record import Check

BACKOFF = 0.2  # lr factor after a patch checked worse than none


def final(model, ids, mask, head: Head | None) -> torch.Tensor:
    """The model's last hidden states [B, T, D] when `head` (core/head.head_of) makes the logits, else its
    logits [B, T, V]: what `kl_loss` takes."""
    if head is None:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return trunk(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def kl_loss(teacher_lp: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, cfg,
            head: Head | None = None):
    """Mean per-token KL over real (mask == 1) positions, in fp32; scaled by T^2.

    With `head`, `student_logits` are the student's last hidden states and `teacher_lp` the teacher's (or its
    log-probs, when cached): the head, log-softmax and KL then run over chunks of tokens (CHUNK_BUDGET), each
    chunk recomputed in the backward pass when there are several (activation checkpointing), so memory does
    not grow with tokens x vocabulary."""
    if head is None:
        per_token = _per_token(student_logits, teacher_lp, cfg)
    else:
        per_token = _chunked(student_logits, teacher_lp, cfg, head)
    keep = mask.bool()
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))  # NaN-safe at pad positions
    # A KL is never negative, but its mean rounds below zero where the two models agree to float precision.
    return (per_token.sum() / keep.sum()).clamp_min(0) * cfg.temperature**2


def _per_token(student_logits, teacher, cfg, head: Head | None = None):
    """KL per token of student logits (or, with `head`, last states) against teacher log-probs (or states)."""
    s_lp = _scaled(student_logits if head is None else head(student_logits), cfg.temperature).log_softmax(-1)
    if head is not None and teacher.shape[-1] != head.vocab:
        teacher = _scaled(head(teacher), cfg.temperature).log_softmax(-1)
    teacher = teacher.float()
    # F.kl_div(input, target) = exp(target) * (target - input): one vocab-sized temporary, not three.
    if cfg.kl == "forward":
        return F.kl_div(s_lp, teacher, log_target=True, reduction="none").sum(-1)
    return F.kl_div(teacher, s_lp, log_target=True, reduction="none").sum(-1)


def _chunked(student, teacher, cfg, head: Head):
    shape = student.shape[:-1]
    s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    step = chunk_tokens(head.vocab, CHUNK_BUDGET)
    if step >= s.shape[0]:
        return _per_token(s, t, cfg, head).reshape(shape)
    parts = []
    for lo in range(0, s.shape[0], step):
        args = (s[lo : lo + step], t[lo : lo + step], cfg, head)
        parts.append(checkpoint(_per_token, *args, use_reentrant=False) if s.requires_grad else _per_token(*args))
    return torch.cat(parts).reshape(shape)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / T, without a vocab-sized copy when nothing changes (fp32, T = 1)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


class Targets:
    """What the intact model gives for one set of sequences at one prefix layer and temperature, kept for every
    training on them: per sequence (fp16 log-probs, prefix states), and the no-patch KL of each held-out check
    (keyed by the ablated weights, the sequences and the KL's direction)."""

    def __init__(self):
        self.by_sequence: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.broken: dict[tuple, float] = {}


@dataclass
class Sequences:
    """Training sequences [N, T], their mask (None: packed, every token real), what made them (`key`:
    engine/train.training_data) and the intact model's targets for them once computed, by (prefix layer,
    temperature): hand the same Sequences to several trainings and the teacher runs once per sequence."""

    ids: torch.Tensor
    mask: torch.Tensor | None = None
    key: tuple = ()
    targets: dict[tuple, Targets] = field(default_factory=dict)

    def targets_for(self, layer: int, temperature: float) -> Targets:
        return self.targets.setdefault((layer, temperature), Targets())

    def held_out(self, check_sequences: int) -> int:
        """How many of the last sequences a training with `check_sequences` holds out: none when too few remain."""
        return check_sequences if self.ids.shape[0] > check_sequences + 1 else 0

    def trained_part(self, check_sequences: int) -> "Sequences":
        """The sequences such a training draws from, sharing these targets: a control trained unchecked on the
        data the checked patch trained on."""
        n = self.ids.shape[0] - self.held_out(check_sequences)
        return Sequences(self.ids[:n], None if self.mask is None else self.mask[:n], (*self.key, n), self.targets)


class Teacher:
    """The intact model's log-probs and the shared prefix states of training sequences, computed once per
    sequence and kept (fp16 log-probs) when `keep`, in `targets` when given (shared with other trainings)."""

    def __init__(self, model, prefix: Prefix, sequences, mask, cfg, keep: bool, targets: Targets | None = None):
        self.model, self.prefix, self.sequences, self.mask, self.cfg, self.keep = model, prefix, sequences, mask, cfg, keep
        self.device = input_device(model)
        self.head = head_of(model)
        self.targets = targets if keep and targets is not None else Targets()
        self.cache = self.targets.by_sequence

    def __call__(self, idx: list[int]):
        """(ids, mask, teacher targets, prefix hidden states) of sequences `idx`. The targets are what `kl_loss` takes
        with `self.head`: log-probs (fp32; fp16 when cached), or with a head and no cache the last states."""
        ids, m = self.sequences[idx].to(self.device), self.mask[idx].to(self.device)
        if all(i in self.cache for i in idx):
            lp = torch.stack([self.cache[i][0] for i in idx])
            return ids, m, lp if self.head is not None else lp.float(), torch.stack([self.cache[i][1] for i in idx])
        with torch.no_grad(), self.prefix.capture():
            out = final(self.model, ids, m, self.head)
        hidden = self.prefix.hidden
        if self.head is not None and not self.keep:
            return ids, m, out, hidden
        with torch.no_grad():
            lp = self._log_probs(out)
        del out  # not needed during the student pass: one vocab-sized tensor less at peak
        if self.keep:
            # Round through fp16 on first use too, so a resumed run (empty cache) sees the same targets.
            lp = lp.half()
            for k, i in enumerate(idx):
                self.cache[i] = (lp[k], hidden[k])
            lp = lp if self.head is not None else lp.float()
        return ids, m, lp, hidden

    def _log_probs(self, out: torch.Tensor) -> torch.Tensor:
        """fp32 log-probs of logits, or of last states a chunk at a time (fp16 when they are to be cached)."""
        if self.head is None:
            return _scaled(out, self.cfg.temperature).log_softmax(-1)
        flat = out.reshape(-1, out.shape[-1])
        step = chunk_tokens(self.head.vocab, CHUNK_BUDGET)
        dtype = torch.float16 if self.keep else torch.float32
        lp = [_scaled(self.head(flat[lo : lo + step]), self.cfg.temperature).log_softmax(-1).to(dtype)
              for lo in range(0, flat.shape[0], step)]
        return torch.cat(lp).reshape(*out.shape[:-1], -1)

    def loss(self, batch, ablation, patch):
        """The student's KL to the teacher on `batch` (what __call__ returned), with `ablation` and `patch` on."""
        ids, m, target, hidden = batch
        with ablation, patch, self.prefix.reuse(hidden):
            student = final(self.model, ids, m, self.head)
            return kl_loss(target, student, m, self.cfg, self.head)


class Distillation:
    """The objective one training run minimises: the student's KL to `teacher` with `ablation` and `patch` on,
    as this process's share of the mean over the batch (`dp`: stages/distributed.DataParallel)."""

    def __init__(self, teacher: Teacher, ablation, patch, dp):
        self.teacher, self.ablation, self.patch, self.dp = teacher, ablation, patch, dp

    def loss(self, batch) -> torch.Tensor:
        return self.dp.share_of_mean(self.teacher.loss(batch, self.ablation, self.patch), batch[1])


class HeldOutCheck:
    """KL(intact || ablated + patch) on held-out sequences; keeps the best patch seen and counts back-offs.

    The first check is of the patch training starts from (zero: the ablated model itself), so the patch handed
    over is never worse than no patch on these sequences."""

    def __init__(self, teacher: Teacher, sequences: list[int], ablation, patch, cfg, state: dict | None):
        self.teacher, self.sequences, self.ablation, self.patch, self.cfg = teacher, sequences, ablation, patch, cfg
        self.tokens = int(teacher.mask[sequences].sum())
        if state is None:  # a fresh run (the no-patch KL is the same for every training on these sequences)
            known, key = teacher.targets.broken, (tuple(map(str, ablation.coords)), tuple(sequences), cfg.kl)
            if key not in known:
                known[key] = self.kl(with_patch=False)
            self.broken = known[key]
            start = self.kl() if any(v.abs().sum() > 0 for v in patch.vectors) else self.broken
            state = {"broken": self.broken, "best": start, "best_step": 0, "backoffs": 0, "lr_scale": 1.0,
                     "vectors": [v.detach().cpu().clone() for v in patch.vectors]}
        self.state = state

    @torch.no_grad()
    def kl(self, with_patch: bool = True) -> float:
        total = 0.0
        for i in range(0, len(self.sequences), 2):
            batch = self.teacher(self.sequences[i : i + 2])
            patch = self.patch if with_patch else contextlib.nullcontext()
            total += self.teacher.loss(batch, self.ablation, patch).item() * int(batch[1].sum())
        return total / self.tokens

    def update(self, step: int, diverged: bool = False, back_off: bool = True) -> bool:
        """Check the current patch at `step`; True when it does worse than none: the best patch is back in place,
        and with `back_off` (a first-order run, which trains on from it) a back-off is counted and the lr scale
        cut. L-BFGS checks once, at its end, and trains no further: back_off=False."""
        value = math.inf if diverged else self.kl()
        if value < self.state["best"]:
            self.state.update(best=value, best_step=step, vectors=[v.detach().cpu().clone() for v in self.patch.vectors])
            return False
        if math.isfinite(value) and value <= self.state["broken"]:
            return False
        self.restore_best()
        if back_off:
            self.state["backoffs"] += 1
            self.state["lr_scale"] *= BACKOFF
        return True

    def restore_best(self) -> None:
        with torch.no_grad():
            for v, b in zip(self.patch.vectors, self.state["vectors"]):
                v.copy_(b.to(v.device))

    def record(self) -> Check:
        st = self.state
        return Check(tokens=self.tokens, broken_kl=st["broken"], best_kl=st["best"], best_step=st["best_step"],
                     backoffs=st["backoffs"])
