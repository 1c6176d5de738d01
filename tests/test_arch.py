"""arch.py: finding down-projections in every supported family and addressing them as W[row=d_model, col=d_ff]."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tiny
from superweight.core import arch
from superweight.errors import CoordinateError, SuperweightError, UnsupportedArchitectureError, UsageError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ALL = sorted(arch.FAMILIES)
N_LAYERS = 3  # differs from tiny's default so that a hard-coded 2 cannot pass


@pytest.fixture(params=ALL)
def fam(request) -> str:
    return request.param


@pytest.fixture
def model(fam):
    return tiny.tiny_model(fam, seed=0, num_hidden_layers=N_LAYERS)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_tiny_covers_every_supported_family():
    assert set(tiny.FAMILIES) == set(arch.FAMILIES)
    assert tiny.D_MODEL != tiny.D_FF


def test_family_name(model, fam):
    assert arch.family(model) == fam


def test_down_projections_count_shapes_names(model, fam):
    dps = arch.down_projections(model)
    assert len(dps) == N_LAYERS == model.config.num_hidden_layers
    assert [dp.layer for dp in dps] == list(range(N_LAYERS))
    assert len({id(dp.module) for dp in dps}) == N_LAYERS  # one distinct module per layer
    for dp in dps:
        assert (dp.d_model, dp.d_ff) == (tiny.D_MODEL, tiny.D_FF)
        assert dp.matrix.shape == (tiny.D_MODEL, tiny.D_FF)
        assert model.get_submodule(dp.name) is dp.module
        assert dp.name.endswith(f".{dp.layer}.{arch.FAMILIES[fam][1]}")
        # The module really is an MLP output: it maps d_ff -> d_model.
        out = dp.module(torch.zeros(1, tiny.D_FF))
        assert out.shape == (1, tiny.D_MODEL)
        # The stored parameter is [d_ff, d_model] only for GPT-2's Conv1D.
        assert dp.transposed == (fam == "gpt2")
        expected = (tiny.D_FF, tiny.D_MODEL) if fam == "gpt2" else (tiny.D_MODEL, tiny.D_FF)
        assert tuple(dp.weight.shape) == expected
        assert dp.weight is dp.module.weight


def test_down_projection_by_layer(model):
    dps = arch.down_projections(model)
    for i in range(N_LAYERS):
        assert arch.down_projection(model, i).module is dps[i].module


def test_decoder_layers(model, fam):
    layers = arch.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == N_LAYERS
    for dp, block in zip(arch.down_projections(model), layers):
        assert dp.block is block
        assert any(m is dp.module for m in block.modules())
    # The blocks' outputs are the residual stream: hidden_states[i + 1] for every block but the last
    # (the last hidden state has the final norm applied).
    seen = {}
    handles = [b.register_forward_hook(lambda _m, _i, o, k=k: seen.__setitem__(k, o)) for k, b in enumerate(layers)]
    try:
        with torch.no_grad():
            hs = model(torch.arange(2, 14)[None], output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()
    assert len(hs) == N_LAYERS + 1
    for k in range(N_LAYERS - 1):
        out = seen[k][0] if isinstance(seen[k], tuple) else seen[k]
        assert torch.equal(out, hs[k + 1])


def test_describe(model, fam):
    info = arch.describe(model)
    assert info.family == fam
    assert info.model_class == type(model).__name__
    assert (info.n_layers, info.d_model, info.d_ff) == (N_LAYERS, tiny.D_MODEL, tiny.D_FF)
    assert info.n_params == sum(p.numel() for p in model.parameters())
    assert info.down_proj_names == [dp.name for dp in arch.down_projections(model)]


# Coordinates chosen so that row < d_model <= col: a swapped (row, col) cannot index the same element.
ROW, COL = 5, 41


def test_scalar_write_read_round_trip(model, fam):
    dp = arch.down_projection(model, 1)
    before = _snapshot(model)
    old = dp.get(ROW, COL)
    assert old.shape == () and old.dtype == dp.weight.dtype
    dp.set(ROW, COL, 3.25)
    assert dp.get(ROW, COL).item() == 3.25
    # The stored element is the translated one: [row, col] for Linear, [col, row] for Conv1D.
    stored = dp.weight[COL, ROW] if fam == "gpt2" else dp.weight[ROW, COL]
    assert stored.item() == 3.25
    # Exactly one element of the whole model changed.
    after = model.state_dict()
    changed = {k: int((after[k] != before[k]).sum()) for k in before if not torch.equal(after[k], before[k])}
    assert changed == {dp.name + ".weight": 1}
    # get() is a copy: changing it does not write through.
    copy = dp.get(ROW, COL)
    copy.fill_(-1.0)
    assert dp.get(ROW, COL).item() == 3.25
    # A tensor value works too, and writing the original back restores the model exactly.
    dp.set(ROW, COL, old)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_row_write_read_round_trip(model, fam):
    dp = arch.down_projection(model, 0)
    before = _snapshot(model)
    old = dp.row(ROW)
    assert old.shape == (tiny.D_FF,)
    assert torch.equal(old, dp.matrix[ROW])
    new = torch.arange(tiny.D_FF, dtype=torch.float32) / 7.0
    dp.set_row(ROW, new)
    assert torch.equal(dp.row(ROW), new)
    stored = dp.weight[:, ROW] if fam == "gpt2" else dp.weight[ROW, :]
    assert torch.equal(stored, new)
    # Only that row changed.
    w_before = before[dp.name + ".weight"]
    w_now = dp.weight.detach()
    diff = (w_now != w_before).nonzero().tolist()
    expected = {(c, ROW) for c in range(tiny.D_FF)} if fam == "gpt2" else {(ROW, c) for c in range(tiny.D_FF)}
    assert {tuple(x) for x in diff} <= expected
    assert len(diff) >= tiny.D_FF - 1
    # row() is a copy.
    r = dp.row(ROW)
    r.zero_()
    assert torch.equal(dp.row(ROW), new)
    dp.set_row(ROW, old)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_coordinate_convention_matches_the_forward_pass(model, fam):
    """Feeding e_col into the down-projection moves output channel `row` by exactly W[row, col]."""
    dp = arch.down_projection(model, 1)
    dp.set(ROW, COL, 7.5)  # a value no random init produces
    with torch.no_grad():
        zero = dp.module(torch.zeros(1, 1, dp.d_ff))  # = the bias (or 0)
        e_col = torch.zeros(1, 1, dp.d_ff)
        e_col[..., COL] = 1.0
        out = dp.module(e_col)
    delta = (out - zero)[0, 0]
    assert delta.shape == (dp.d_model,)
    torch.testing.assert_close(delta[ROW], torch.tensor(7.5), rtol=0, atol=1e-6)
    # And every other channel moves by its own W[., col]: the whole column of the [d_model, d_ff] matrix.
    torch.testing.assert_close(delta, dp.matrix[:, COL].detach(), rtol=1e-6, atol=1e-6)
    # The planted value is seen in exactly one output channel.
    assert int((delta - 7.5).abs().lt(1e-4).sum()) == 1


def test_coordinate_errors(model):
    dp = arch.down_projection(model, 0)
    dp.check(0, 0)
    dp.check(tiny.D_MODEL - 1, tiny.D_FF - 1)
    dp.check(tiny.D_MODEL - 1)  # row only
    bad = [(tiny.D_MODEL, 0), (-1, 0), (0, tiny.D_FF), (0, -1), (tiny.D_FF - 1, 0)]
    for row, col in bad:
        with pytest.raises(CoordinateError) as err:
            dp.check(row, col)
        msg = str(err.value)
        assert "\n" not in msg
        assert ("row" in msg and str(tiny.D_MODEL) in msg) or ("column" in msg and str(tiny.D_FF) in msg)
    with pytest.raises(CoordinateError, match="row"):
        dp.check(tiny.D_MODEL)
    for layer in (N_LAYERS, -1, 100):
        with pytest.raises(CoordinateError, match=f"{N_LAYERS} layers"):
            arch.down_projection(model, layer)
    # CoordinateError is a usage error (exit code 2 at the CLI).
    assert issubclass(CoordinateError, UsageError)
    assert CoordinateError.exit_code == 2


def _assert_unsupported(model, name: str):
    for fn in (arch.family, arch.decoder_layers, arch.down_projections, arch.describe):
        with pytest.raises(UnsupportedArchitectureError) as err:
            fn(model)
        msg = str(err.value)
        assert name in msg
        for fam in arch.FAMILIES:
            assert fam in msg
        assert "\n" not in msg
    assert issubclass(UnsupportedArchitectureError, SuperweightError)


def test_unsupported_architecture_bloom():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).eval()
    _assert_unsupported(model, "bloom")


def test_unsupported_architecture_plain_module():
    _assert_unsupported(nn.Sequential(nn.Linear(4, 4)), "None")


def test_gemma3_multimodal_wrapper():
    """Gemma 3's image-text model keeps its decoder under model.language_model.layers."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=tiny.VOCAB, hidden_size=tiny.D_MODEL, intermediate_size=tiny.D_FF, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=4,
    )
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    assert arch.family(model) == "gemma3"
    dps = arch.down_projections(model)
    assert len(dps) == 2
    assert all(".language_model." in dp.name for dp in dps)
    assert all((dp.d_model, dp.d_ff) == (tiny.D_MODEL, tiny.D_FF) for dp in dps)
    assert all(model.get_submodule(dp.name) is dp.module for dp in dps)
    assert arch.decoder_layers(model) is model.get_submodule("model.language_model.layers")


def test_tiny_model_dir_loads(tiny_model_dir):
    from superweight.io import models

    loaded = models.load(str(tiny_model_dir))
    assert arch.family(loaded.model) == "llama"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    reference = tiny.tiny_model("llama", seed=0).state_dict()
    state = loaded.model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    tok = loaded.tokenizer
    assert tok.eos_token == tiny.EOS and tok.pad_token == tiny.PAD
    text = "def f(x):\n    return x  # ok"
    expected = tiny.tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"] == expected
    assert len(tok) <= loaded.model.config.vocab_size
