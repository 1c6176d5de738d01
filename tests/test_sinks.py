"""measure/sinks.py: the mechanism view (attention sink, residual norms, entropy) on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, Compose, RowPatch
from superweight.io.corpora import Bos
from superweight.schema.sinks import SinkCondition, SinkLayer
from superweight.measure.sinks import SINK_THRESHOLD, eager_attention, sink_view, summarize
from tiny import FAMILIES, assert_identical, hook_count, planted, snapshot, tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PLANT = (1, 5, 7)
COORD = WeightCoord(layer=1, row=5, col=7)


def stream(n: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 384, (n,), generator=torch.Generator().manual_seed(seed))


def sink_planted(q: float = 4.0, k: float = 4.0, shared: float = 1.0):
    """`planted(PLANT)` whose massive activation makes an attention sink in every later layer, as in real models:
    the plant's neuron only fires positive (up = gate row: silu(g) * g >= 0), every token carries a constant
    channel 6 that each head's query reads and the sink's key (channel 5, the massive one) answers, in the slowest
    rotary pair (dims 3 and 7 of a head: almost no turn over a window), and the sink's value is zero (a no-op)."""
    model = planted(PLANT)
    with torch.no_grad():
        mlp = model.model.layers[1].mlp
        mlp.up_proj.weight[7] = mlp.gate_proj.weight[7]
        model.model.embed_tokens.weight[:, 6] = shared
        for block in model.model.layers[2:]:
            a = block.self_attn
            for h in range(4):
                a.q_proj.weight[h * 8 + 3] = 0
                a.q_proj.weight[h * 8 + 3, 6] = q
            for h in range(2):
                a.k_proj.weight[h * 8 + 3] = 0
                a.k_proj.weight[h * 8 + 3, 5] = k
            a.v_proj.weight[:, 5] = 0
    return model


@pytest.fixture(scope="module")
def view():
    """The view on the sink-planted llama run with sdpa attention, broken = the plant zeroed, patched = the
    oracle (the deleted weight put back through the row patch)."""
    model = sink_planted()
    model.config._attn_implementation = "sdpa"  # what a loaded model runs with; the view must put it back
    before, hooks = snapshot(model), hook_count(model)
    d = torch.zeros(down_projection(model, 1).d_ff)
    d[7] = down_projection(model, 1).get(5, 7).item()
    ablation = Ablation(model, [COORD])
    conditions = {"broken": ablation, "patched": Compose(ablation, RowPatch(model, [(1, 5)], [d]))}
    result = sink_view(model, stream(), conditions, (1, 5), window=64)
    assert model.config._attn_implementation == "sdpa"
    assert all(m.config._attn_implementation == "sdpa" for m in model.modules() if hasattr(m, "config"))
    assert_identical(model, before)
    assert hook_count(model) == hooks
    return result


def test_every_layer_has_every_number_for_each_condition(view):
    assert [e.layer for e in view.layers] == list(range(6))
    assert view.windows == 8 and view.n_tokens == 512 and view.window == 64 and view.channel == "1:5"
    assert view.threshold == SINK_THRESHOLD and len(view.positions) == 8 and all(view.positions)
    for e in view.layers:
        assert set(e.conditions) == {"base", "broken", "patched"}
        for c in e.conditions.values():
            for v in c.model_dump().values():
                assert math.isfinite(v)
            assert 0 <= c.sink_mass <= 1 and 0 <= c.sink_heads <= 1 and c.sink_mass_std >= 0
            assert c.norm_massive > 0 and c.norm_typical > 0 and c.entropy > 0


def test_the_damage_starts_at_the_planted_layer(view):
    base = [e.conditions["base"] for e in view.layers]
    broken = [e.conditions["broken"] for e in view.layers]
    for j in (0, 1):  # attention up to the planted layer runs before its MLP: untouched
        assert broken[j].sink_mass == base[j].sink_mass and broken[j].entropy == base[j].entropy
        assert view.layers[j].entropy_undone is None
    assert broken[0].norm_massive == base[0].norm_massive
    # The massive activation is gone after the planted block, and attention after it changes.
    assert broken[1].norm_massive < base[1].norm_massive / 10
    assert base[1].norm_massive > 10 * base[1].norm_typical
    for j in range(2, 6):  # the planted sink: every head has it, and loses it with the weight
        assert base[j].sink_mass > 0.5 and base[j].sink_heads == 1
        assert broken[j].sink_mass < 0.1 and broken[j].sink_heads == 0
        assert broken[j].entropy > base[j].entropy + 0.3  # attention spreads out
    assert view.breaks_at == 2


def test_on_the_plain_plant_attention_changes_after_the_planted_layer():
    model = planted(PLANT)
    view = sink_view(model, stream(), {"broken": Ablation(model, [COORD])}, (1, 5), window=64)
    base = [e.conditions["base"] for e in view.layers]
    broken = [e.conditions["broken"] for e in view.layers]
    assert [b.sink_mass == a.sink_mass for a, b in zip(base, broken)] == [True, True, False, False, False, False]
    assert view.layers[1].entropy_undone is None and view.restored is None


def test_the_oracle_patch_undoes_it(view):
    for e in view.layers:
        b, p = e.conditions["base"], e.conditions["patched"]
        assert p.sink_mass == pytest.approx(b.sink_mass, abs=1e-4)
        assert p.norm_massive == pytest.approx(b.norm_massive, rel=1e-4)
    assert all(e.entropy_undone == pytest.approx(1.0, abs=1e-3) for e in view.layers[2:])
    assert view.restored == pytest.approx(1.0, abs=1e-3)


def test_eager_attention_is_put_back_even_on_error():
    model = tiny_model("llama")
    model.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with eager_attention(model):
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


def _layer(j: int, base: float, broken: float, patched: float) -> SinkLayer:
    def c(m):
        return SinkCondition(sink_mass=m, sink_mass_std=0.0, sink_heads=float(m > 0.3), entropy=1.0,
                             norm_massive=1.0, norm_typical=1.0)

    return SinkLayer(layer=j, conditions={"base": c(base), "broken": c(broken), "patched": c(patched)})


def test_the_sink_breaks_at_the_first_layer_that_loses_half_of_it():
    layers = [_layer(0, 0.1, 0.1, 0.1), _layer(1, 0.6, 0.35, 0.6), _layer(2, 0.8, 0.2, 0.5), _layer(3, 0.7, 0.1, 0.7)]
    breaks, restored = summarize(layers)
    assert breaks == 2
    assert restored == pytest.approx((0.3 + 0.6) / (0.6 + 0.6))  # layers 2 and 3, summed
    assert summarize([_layer(0, 0.5, 0.6, 0.5), _layer(1, 0.5, 0.3, 0.5)]) == (None, None)  # 0.3 > 0.25


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gives_its_attention_to_the_view(family):
    """Each family's attention module is found and returns its weights under eager attention."""
    model = tiny_model(family, num_hidden_layers=2)
    dp = down_projection(model, 0)
    row = 3
    col = int(dp.row(row).abs().argmax())
    view = sink_view(model, stream(256), {"broken": Ablation(model, [WeightCoord(layer=0, row=row, col=col)])},
                     (0, row), window=32)
    assert len(view.layers) == 2 and view.layers[1].conditions["broken"].entropy > 0
    assert view.layers[1].conditions["broken"].sink_mass != view.layers[1].conditions["base"].sink_mass
    assert hook_count(model) == 0


def test_with_a_bos_the_sink_is_position_zero():
    model = tiny_model("gemma3", num_hidden_layers=3)  # sliding and global layers
    view = sink_view(model, stream(300), {}, (1, 4), bos=Bos.first(0), window=32)
    assert view.windows == 300 // 31 and view.n_tokens == view.windows * 31
    assert all(p[0] == 0 for p in view.positions)
    assert set(view.layers[0].conditions) == {"base"} and view.breaks_at is None and view.restored is None


def test_shared_prefix_gives_the_same_view(view):
    """Conditions that start from the base's hidden state at the ablated layer (share_below=1) give the view
    measured with every block run for every condition, number for number."""
    model = sink_planted()
    d = torch.zeros(down_projection(model, 1).d_ff)
    d[7] = down_projection(model, 1).get(5, 7).item()
    ablation = Ablation(model, [COORD])
    conditions = {"broken": ablation, "patched": Compose(ablation, RowPatch(model, [(1, 5)], [d]))}
    shared = sink_view(model, stream(), conditions, (1, 5), window=64, share_below=1)
    a, b = shared.model_dump(exclude={"seconds"}), view.model_dump(exclude={"seconds"})
    assert a.keys() == b.keys()
    for la, lb in zip(a["layers"], b["layers"]):
        for name in lb["conditions"]:
            for key, value in lb["conditions"][name].items():
                assert la["conditions"][name][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (la["layer"], name, key)
    assert (a["breaks_at"], a["positions"]) == (b["breaks_at"], b["positions"])
    assert a["restored"] == pytest.approx(b["restored"], rel=1e-6)
