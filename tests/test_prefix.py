"""prefix.Prefix: the student reuses the teacher's hidden state below the first edited layer."""

from __future__ import annotations

import pytest
import torch

import tiny
from superweight.core.arch import decoder_layers, down_projection
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation
from superweight.core.prefix import Prefix

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FAMILIES = ["llama", "gpt2", "gpt_neox", "opt", "gemma2", "phi3"]
GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(2, 384, (2, 10), generator=GEN)
OTHER_IDS = torch.randint(2, 384, (2, 10), generator=GEN)
MASK = torch.ones_like(IDS)
MASK[1, 7:] = 0  # right padding, as repair.train feeds it


def hook_count(model) -> int:
    return sum(
        len(getattr(m, attr))
        for m in model.modules()
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def assert_blocks_restored(model) -> None:
    for block in decoder_layers(model):
        assert "forward" not in vars(block)
        assert block.forward.__func__ is type(block).forward
    assert hook_count(model) == 0


def strong_ablation(model, layer: int) -> list[WeightCoord]:
    """Ablate a weight after making it large, so that the ablated logits differ clearly from the intact."""
    dp = down_projection(model, layer)
    dp.set(3, 5, 4.0)
    return [WeightCoord(layer=layer, row=3, col=5)]


def run(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("layer", [1, 0])
@pytest.mark.parametrize("family", FAMILIES)
def test_reused_prefix_gives_the_full_forward_logits(family, layer):
    model = tiny.tiny_model(family, seed=1, num_hidden_layers=3)
    coords = strong_ablation(model, layer)
    with torch.no_grad():
        with Ablation(model, coords):
            reference = run(model, IDS, MASK)
        prefix = Prefix(model, layer)
        with prefix.capture():
            intact = run(model, IDS, MASK)
        assert_blocks_restored(model)
        assert prefix.hidden is not None and prefix.hidden.shape == (*IDS.shape, tiny.D_MODEL)
        assert not prefix.hidden.requires_grad
        with Ablation(model, coords), prefix.reuse(prefix.hidden):
            student = run(model, IDS, MASK)
    assert_blocks_restored(model)
    assert (reference - intact).abs().max() > 1e-2  # the ablation is visible downstream
    torch.testing.assert_close(student, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_reuse_skips_the_lower_blocks_and_feeds_the_given_state(family):
    model = tiny.tiny_model(family, seed=2, num_hidden_layers=3)
    prefix = Prefix(model, 2)
    with torch.no_grad():
        with prefix.capture():
            expected = run(model, IDS)
        hidden = prefix.hidden
        calls = {i: 0 for i in range(3)}
        handles = [
            down_projection(model, i).module.register_forward_hook(
                lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1)
            )
            for i in range(3)
        ]
        try:
            # Other token ids of the same shape: blocks 2.. see only the cached state, so the logits are
            # those of IDS (every family here adds its positions before the blocks or from the shape).
            with prefix.reuse(hidden):
                got = run(model, OTHER_IDS)
        finally:
            for h in handles:
                h.remove()
        plain = run(model, OTHER_IDS)
    assert calls == {0: 0, 1: 0, 2: 1}
    assert (plain - expected).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_blocks_restored(model)


def test_capture_keeps_the_last_pass_and_detaches():
    model = tiny.tiny_model("llama", seed=0, num_hidden_layers=3)
    prefix = Prefix(model, 1)
    embeds = model.get_input_embeddings()
    with prefix.capture():
        run(model, OTHER_IDS)
        first = prefix.hidden
        run(model, IDS)
    assert not torch.equal(first, prefix.hidden)
    again = Prefix(model, 1)
    with torch.no_grad(), again.capture():
        run(model, IDS)
    assert torch.equal(again.hidden, prefix.hidden)
    # Layer 0's input is the embedding output.
    p0 = Prefix(model, 0)
    with torch.no_grad(), p0.capture():
        run(model, IDS)
    assert torch.equal(p0.hidden, embeds(IDS))
    assert hook_count(model) == 0


def test_reuse_cleans_up_when_the_block_raises():
    model = tiny.tiny_model("gpt2", seed=0, num_hidden_layers=3)
    prefix = Prefix(model, 2)
    with torch.no_grad(), prefix.capture():
        run(model, IDS)
    with pytest.raises(ZeroDivisionError):
        with prefix.reuse(prefix.hidden):
            assert "forward" in vars(decoder_layers(model)[0])
            1 / 0
    assert_blocks_restored(model)


def test_reuse_gradients_flow_from_the_layer_up():
    # The student's loss must still reach parameters at/after the reused layer (here: a patch-like leaf).
    model = tiny.tiny_model("llama", seed=0, num_hidden_layers=3)
    prefix = Prefix(model, 1)
    with torch.no_grad(), prefix.capture():
        run(model, IDS)
    hidden = prefix.hidden.clone().requires_grad_(True)
    with prefix.reuse(hidden):
        run(model, IDS).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_reuse_restores_a_preexisting_instance_forward():
    model = tiny.tiny_model("llama", seed=0, num_hidden_layers=3)
    block = decoder_layers(model)[0]
    class_forward = block.forward

    def wrapped(*args, **kwargs):  # what accelerate.hooks.add_hook_to_module installs
        return class_forward(*args, **kwargs)

    block.forward = wrapped
    prefix = Prefix(model, 1)
    with torch.no_grad(), prefix.capture():
        run(model, IDS)
    with torch.no_grad(), prefix.reuse(prefix.hidden):
        run(model, IDS)
    assert vars(block).get("forward") is wrapped
