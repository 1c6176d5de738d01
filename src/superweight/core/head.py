"""The trunk and the LM head apart, so logits can be made a chunk of tokens at a time.

    head = head_of(model)                                  # None: this model's logits are not head(trunk) here
    h = trunk(model)(input_ids=ids, use_cache=False).last_hidden_state    # [B, T, D]: no vocab-sized tensor
    for lo in range(0, n, chunk_tokens(vocab, budget)):    # each chunk's logits, then dropped
        logits = head(h[lo : lo + chunk])

A causal LM's logits are its output embedding applied to the trunk's last hidden state, with Gemma 2/3's final
soft-capping when the config sets one. `head_of` checks that on a four-token probe the first time it sees a
model, and answers None when the model's own logits differ (an architecture doing something else), so callers
fall back to the whole logits.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from superweight.core.arch import input_device

CHUNK_BUDGET = 256 * 2**20  # bytes of vocab-sized fp32 tensors alive at once, by default
LIVE_COPIES = 4  # vocab-sized fp32 tensors a chunk holds at once (logits / log-probs, base log-probs, p, a temp)
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trunk(model: nn.Module) -> nn.Module:
    """The model without its LM head (`base_model`: its output's last_hidden_state feeds the head)."""
    return getattr(model, "base_model", model)


def chunk_tokens(vocab: int, budget_bytes: int, copies: int = LIVE_COPIES) -> int:
    """Tokens per chunk so that `copies` fp32 tensors of [chunk, vocab] fit in `budget_bytes` (at least 1)."""
    return max(1, budget_bytes // (vocab * 4 * copies))


class Head:
    """The output embedding and the final soft-cap: logits of final hidden states [..., D]."""

    def __init__(self, model: nn.Module):
        self.linear = model.get_output_embeddings()
        config = getattr(model.config, "get_text_config", lambda: model.config)()
        self.cap = getattr(config, "final_logit_softcapping", None)
        self.vocab = self.linear.weight.shape[0]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.linear(h)
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def head_of(model: nn.Module) -> Head | None:
    """The model's head, checked once against its own logits on a four-token probe; None when they differ."""
    if trunk(model) is model or model.get_output_embeddings() is None:
        return None
    if model not in _VERIFIED:
        head = Head(model)
        ids = torch.arange(1, 5, device=input_device(model))[None] % head.vocab
        with torch.no_grad():
            whole = model(input_ids=ids, use_cache=False).logits.float()
            mine = head(trunk(model)(input_ids=ids, use_cache=False).last_hidden_state).float()
        scale = whole.abs().max().clamp_min(1e-30)
        _VERIFIED[model] = head if bool(((whole - mine).abs().max() / scale) <= 1e-5) else None
    return _VERIFIED[model]
