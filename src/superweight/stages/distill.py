"""Distillation against the intact model: the loss, the teacher's targets, and the held-out check.

    teacher = Teacher(model, prefix, sequences, mask, cfg, keep=True)
    ids, m, teacher_lp, hidden = teacher([0, 1])       # rows 0 and 1: intact log-probs and prefix states
    check = HeldOutCheck(teacher, [30, 31], ablation, patch, prefix, cfg, state=None)
    check.update(step)                                  # True: worse than no patch, the best patch is back

The check is what makes a repair never worse than no patch: its first value is the ablated model's own KL on
rows that training never sees, a patch is kept only when it beats every one checked before, and a patch that
does worse than none sends training back to the best one (stages/train.py then cuts the lr 5x).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from superweight.core.arch import input_device
from superweight.core.prefix import Prefix
from superweight.io.record import Check

BACKOFF = 0.2  # lr factor after a patch checked worse than none


def kl_loss(teacher_lp: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, cfg):
    """Mean per-token KL over real (mask == 1) positions, in fp32; scaled by T^2."""
    s_lp = _scaled(student_logits, cfg.temperature).log_softmax(-1)
    # F.kl_div(input, target) = exp(target) * (target - input): one vocab-sized temporary, not three.
    if cfg.kl == "forward":
        per_token = F.kl_div(s_lp, teacher_lp, log_target=True, reduction="none").sum(-1)
    else:
        per_token = F.kl_div(teacher_lp, s_lp, log_target=True, reduction="none").sum(-1)
    keep = mask.bool()
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))  # NaN-safe at pad positions
    # A KL is never negative, but its mean rounds below zero where the two models agree to float precision.
    return (per_token.sum() / keep.sum()).clamp_min(0) * cfg.temperature**2


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / T, without a vocab-sized copy when nothing changes (fp32, T = 1)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


class Teacher:
    """The intact model's log-probs and the shared prefix states of training rows, computed once per row and
    kept (fp16 log-probs) when `keep`."""

    def __init__(self, model, prefix: Prefix, sequences, mask, cfg, keep: bool):
        self.model, self.prefix, self.sequences, self.mask, self.cfg, self.keep = model, prefix, sequences, mask, cfg, keep
        self.device = input_device(model)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, idx: list[int]):
        """(ids, mask, teacher log-probs fp32, prefix hidden states) of rows `idx`."""
        ids, m = self.sequences[idx].to(self.device), self.mask[idx].to(self.device)
        if all(i in self.cache for i in idx):
            lp = torch.stack([self.cache[i][0] for i in idx]).float()
            return ids, m, lp, torch.stack([self.cache[i][1] for i in idx])
        with torch.no_grad(), self.prefix.capture():
            logits = self.model(input_ids=ids, attention_mask=m, use_cache=False).logits
        lp = _scaled(logits, self.cfg.temperature).log_softmax(-1)
        del logits  # not needed during the student pass: one vocab-sized tensor less at peak
        hidden = self.prefix.hidden
        if self.keep:
            # Round through fp16 on first use too, so a resumed run (empty cache) sees the same targets.
            lp = lp.half()
            for k, i in enumerate(idx):
                self.cache[i] = (lp[k], hidden[k])
            lp = lp.float()
        return ids, m, lp, hidden


class HeldOutCheck:
    """KL(intact || ablated + patch) on held-out rows; keeps the best patch seen and counts back-offs.

    The first check is of the patch training starts from (zero: the ablated model itself), so the patch handed
    over is never worse than no patch on these rows."""

    def __init__(self, teacher: Teacher, rows: list[int], ablation, patch, prefix, cfg, state: dict | None):
        self.teacher, self.rows, self.ablation, self.patch, self.prefix, self.cfg = teacher, rows, ablation, patch, prefix, cfg
        self.tokens = int(teacher.mask[rows].sum())
        if state is None:  # a fresh run
            self.broken = self.kl(with_patch=False)
            start = self.kl() if any(v.abs().sum() > 0 for v in patch.vectors) else self.broken
            state = {"broken": self.broken, "best": start, "best_step": 0, "backoffs": 0, "lr_scale": 1.0,
                     "vectors": [v.detach().cpu().clone() for v in patch.vectors]}
        self.state = state

    @torch.no_grad()
    def kl(self, with_patch: bool = True) -> float:
        total = 0.0
        for i in range(0, len(self.rows), 2):
            ids, m, lp, hidden = self.teacher(self.rows[i : i + 2])
            with self.ablation, (self.patch if with_patch else contextlib.nullcontext()), self.prefix.reuse(hidden):
                student = self.teacher.model(input_ids=ids, attention_mask=m, use_cache=False).logits
            total += kl_loss(lp, student, m, self.cfg).item() * int(m.sum())
        return total / self.tokens

    def update(self, step: int, diverged: bool = False) -> bool:
        """Check the current patch at `step`; True when it does worse than none (the caller backs off: the best
        patch is back in place)."""
        value = math.inf if diverged else self.kl()
        if value < self.state["best"]:
            self.state.update(best=value, best_step=step, vectors=[v.detach().cpu().clone() for v in self.patch.vectors])
            return False
        if math.isfinite(value) and value <= self.state["broken"]:
            return False
        self.restore_best()
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
