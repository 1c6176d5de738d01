"""Greedy generations from the base model and under interventions, side by side."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from superweight.core.arch import input_device
from superweight.core.intervene import Intervention

# The seed write-up's eight prompts, plus a quote-closing and a code prompt.
DEFAULT_PROMPTS = [
    "Summer is hot. Winter is",
    "Paris is in France. Tokyo is in",
    "2, 4, 6, 8,",
    "The capital of Canada is",
    "List of numbers: [1, 2, 3",
    "The opposite of big is",
    "A cat is an animal. A rose is a",
    "Complete the analogy: day : night :: up :",
    'She said, "I will be back',
    "def add(a, b):\n    return",
]


@torch.no_grad()
def greedy(model: nn.Module, tokenizer, prompt: str | list[str], max_new_tokens: int = 20) -> str | list[str]:
    """The greedy continuation of `prompt` (new text only); of each prompt of a list, decoded as one batch (left
    padded, so every row's last prompt token is the batch's last position)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(input_device(model))
    finally:
        tokenizer.padding_side = side
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts[0] if isinstance(prompt, str) else texts


def compare(
    model: nn.Module,
    tokenizer,
    conditions: dict[str, Intervention],
    prompts: list[str] | None = None,
    max_new_tokens: int = 20,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, str]]:
    """One row per prompt: {"prompt", "base", <condition name>...}. Each condition decodes every prompt in one
    batch: the steps are the longest continuation's, not the sum over prompts (decoding is per-step overhead)."""
    prompts = list(prompts or DEFAULT_PROMPTS)
    columns = {}
    with _one_thread(input_device(model)):
        columns["base"] = greedy(model, tokenizer, prompts, max_new_tokens)
        for name, intervention in conditions.items():
            with intervention:
                columns[name] = greedy(model, tokenizer, prompts, max_new_tokens)
    if progress:
        progress(len(prompts))
    return [{"prompt": p, **{name: texts[i] for name, texts in columns.items()}} for i, p in enumerate(prompts)]


@contextlib.contextmanager
def _one_thread(device):
    """Decoding on a CPU runs one token at a time: its operations are too small to split between threads, and
    waking the others costs more than they save (on 2 busy cores: 2.5x the time of one thread)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

