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
def greedy(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    """The greedy continuation of `prompt` (new text only)."""
    device = input_device(model)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def compare(
    model: nn.Module,
    tokenizer,
    conditions: dict[str, Intervention],
    prompts: list[str] | None = None,
    max_new_tokens: int = 20,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, str]]:
    """One row per prompt: {"prompt", "base", <condition name>...}."""
    rows = []
    with _one_thread(input_device(model)):
        for prompt in prompts or DEFAULT_PROMPTS:
            rows.append(_row(model, tokenizer, prompt, conditions, max_new_tokens))
            if progress:
                progress(1)
    return rows


def _row(model, tokenizer, prompt: str, conditions: dict[str, Intervention], max_new_tokens: int) -> dict[str, str]:
    row = {"prompt": prompt, "base": greedy(model, tokenizer, prompt, max_new_tokens)}
    for name, intervention in conditions.items():
        with intervention:
            row[name] = greedy(model, tokenizer, prompt, max_new_tokens)
    return row


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

