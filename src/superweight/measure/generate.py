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
    batch: the steps are the longest continuation's, not the sum over prompts (decoding is per-step overhead).
    Conditions that are all edits of dense down-projection rows (an ablation, a row patch: `row_edits`) decode
    in the base's batch too, each on its own rows of it (`_side_by_side`); any other, one batch each."""
    prompts = list(prompts or DEFAULT_PROMPTS)
    edits = {name: c.row_edits() for name, c in conditions.items()}
    with _one_thread(input_device(model)):
        if all(e is not None and not any(dp.module.weight.is_meta for dp, *_ in e) for e in edits.values()):
            columns = _side_by_side(model, tokenizer, prompts, edits, max_new_tokens)
        else:
            columns = {"base": greedy(model, tokenizer, prompts, max_new_tokens)}
            for name, intervention in conditions.items():
                with intervention:
                    columns[name] = greedy(model, tokenizer, prompts, max_new_tokens)
    if progress:
        progress(len(prompts))
    return [{"prompt": p, **{name: texts[i] for name, texts in columns.items()}} for i, p in enumerate(prompts)]


def _side_by_side(model, tokenizer, prompts: list[str], edits: dict, max_new_tokens: int) -> dict[str, list[str]]:
    """Greedy continuations of `prompts` for the base model and each condition in one batch: the prompts once per
    column, and on each condition's rows of the batch each row it edits is computed again from that row's inputs
    with its edited weights, x @ (W[row] + change) (+ bias), in fp32 (adding the change to the output instead
    would cancel a massive activation's share in a low-precision output). In fp32 the texts are those of one
    batch per condition; in bf16 a greedy text can part from them after a near-tie."""
    names, n = ["base", *edits], len(prompts)
    sites: dict = {}  # projection module -> (DownProj, {(column, row): the summed change to W[row]})
    for column, name in enumerate(names[1:], 1):
        for dp, row, change in edits[name]:
            by = sites.setdefault(dp.module, (dp, {}))[1]
            by[column, row] = by.get((column, row), 0) + change

    def hook_for(dp, by):
        def hook(_module, inp, out):
            x = dp.inputs(inp)
            if x.shape[0] != n * len(names):
                raise RuntimeError(f"{dp.where}: a batch of {x.shape[0]} rows, not {n * len(names)}")
            bias = getattr(dp.module, "bias", None)
            with torch.autocast(out.device.type, enabled=False):
                for (column, row), change in by.items():
                    rows = slice(column * n, (column + 1) * n)
                    value = x[rows].float() @ (dp.matrix[row].float() + change.to(x.device))
                    out[rows, ..., row] = (value if bias is None else value + bias[row].float()).to(out.dtype)
            return out
        return hook

    handles = [module.register_forward_hook(hook_for(dp, by)) for module, (dp, by) in sites.items()]
    try:
        texts = greedy(model, tokenizer, prompts * len(names), max_new_tokens)
    finally:
        for h in handles:
            h.remove()
    return {name: texts[i * n : (i + 1) * n] for i, name in enumerate(names)}


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

