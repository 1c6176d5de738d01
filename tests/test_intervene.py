"""intervene.py and coords.py: interventions that come off bit for bit, hooks that leave nothing behind."""

from __future__ import annotations

import pytest
import torch

import tiny
from tiny import assert_identical, snapshot
from superweight.core.arch import down_projection, down_projections
from superweight.core.conditions import (
    BROKEN, RANDOM_K, SCALE, SPREAD, TIMES, TOP_CONTROL, TOP_K, Condition, ablated_weights, descriptions,
    interventions,
)
from superweight.core.coords import WeightCoord, parse_coord, parse_coords
from superweight.core.intervene import Ablation, Compose, NoIntervention, Spread, Trace, hidden
from superweight.errors import CoordinateError, UsageError

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class Boom(Exception):
    pass


def changed_elements(model, before) -> dict[str, int]:
    now = model.state_dict()
    return {k: int((now[k] != before[k]).sum()) for k in before if not torch.equal(now[k], before[k])}


@pytest.fixture(params=["llama", "gpt2"])  # Linear and the transposed Conv1D
def model(request):
    return tiny.tiny_model(request.param, seed=3)


# ---------------------------------------------------------------------------------------------- Ablation

SCALED = [
    WeightCoord(layer=0, row=3, col=40, scale=0.0),
    WeightCoord(layer=0, row=31, col=0, scale=0.5),
    WeightCoord(layer=1, row=0, col=63, scale=-1.0),
    WeightCoord(layer=1, row=17, col=33, scale=2.0),
]


def test_ablation_sets_scaled_values_and_restores(model):
    before = snapshot(model)
    originals = {c.key: down_projection(model, c.layer).get(c.row, c.col) for c in SCALED}
    assert all(v != 0 for v in originals.values())
    ablation = Ablation(model, SCALED)
    assert not ablation.active
    assert_identical(model, before)  # construction writes nothing
    with ablation as entered:
        assert entered is ablation and ablation.active
        for c in SCALED:
            value = down_projection(model, c.layer).get(c.row, c.col)
            assert torch.equal(value, originals[c.key] * c.scale), c
        assert set(changed_elements(model, before)) == {
            down_projection(model, 0).name + ".weight",
            down_projection(model, 1).name + ".weight",
        }
        assert sum(changed_elements(model, before).values()) == len(SCALED)
    assert not ablation.active
    assert_identical(model, before)


def test_ablation_changes_the_output_and_restores_it(model):
    ids = torch.arange(2, 20)[None]
    with torch.no_grad():
        down_projection(model, 0).set(3, 40, 50.0)  # make the ablated weight matter
        before = snapshot(model)
        base = model(ids).logits
        with Ablation(model, [WeightCoord(layer=0, row=3, col=40)]):
            ablated = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(base, ablated)
    assert torch.equal(base, after)
    assert_identical(model, before)


def test_ablation_restores_after_exception(model):
    before = snapshot(model)
    ablation = Ablation(model, SCALED)
    with pytest.raises(Boom):
        with ablation:
            assert changed_elements(model, before)
            raise Boom()
    assert not ablation.active
    assert_identical(model, before)


def test_ablation_reapplies(model):
    before = snapshot(model)
    ablation = Ablation(model, SCALED)
    inside = []
    for _ in range(3):
        with ablation:
            inside.append(snapshot(model))
        assert_identical(model, before)
    for snap in inside[1:]:
        for k in snap:
            assert torch.equal(snap[k], inside[0][k])
    # apply()/remove() by hand as well.
    ablation.apply()
    assert changed_elements(model, before)
    ablation.remove()
    assert_identical(model, before)


def test_ablation_applied_twice_is_refused_and_still_restores(model):
    before = snapshot(model)
    ablation = Ablation(model, SCALED)
    with ablation:
        inside = snapshot(model)
        with pytest.raises(RuntimeError):
            ablation.apply()
        assert_identical(model, inside)  # the refused apply did not scale twice
    assert_identical(model, before)


def test_ablation_same_weight_twice_unwinds_to_the_original(model):
    before = snapshot(model)
    c = WeightCoord(layer=1, row=2, col=50, scale=0.5)
    dp = down_projection(model, 1)
    w = dp.get(2, 50)
    with Ablation(model, [c, c]):
        assert torch.equal(dp.get(2, 50), w * 0.5 * 0.5)
    assert_identical(model, before)


@pytest.mark.parametrize(
    "bad",
    [
        WeightCoord(layer=2, row=0, col=0),  # layer out of range (2 layers)
        WeightCoord(layer=0, row=tiny.D_MODEL, col=0),  # row out of range
        WeightCoord(layer=0, row=0, col=tiny.D_FF),  # col out of range
        WeightCoord(layer=0, row=tiny.D_FF - 1, col=0),  # row in range only if rows/cols were swapped
    ],
)
@pytest.mark.parametrize("bad_first", [False, True])
def test_ablation_with_an_invalid_coordinate_writes_nothing(model, bad, bad_first):
    before = snapshot(model)
    good = WeightCoord(layer=0, row=1, col=1)
    coords = [bad, good] if bad_first else [good, bad]
    with pytest.raises(CoordinateError):
        Ablation(model, coords)
    assert_identical(model, before)


def test_ablation_in_bf16_restores_exactly():
    model = tiny.tiny_model("llama", seed=4).to(torch.bfloat16)
    before = snapshot(model)
    with Ablation(model, SCALED):
        assert changed_elements(model, before)
    assert_identical(model, before)


def test_condition_names_are_built_and_parsed_by_one_pattern():
    edit = NoIntervention()
    c = RANDOM_K(edit, k=4, j=1, draws=3)
    assert c == Condition("rand4_1", edit, "ablate, add the patch keeping k random entries (draw j of 3)")
    assert RANDOM_K.parse("rand4_1") == {"k": 4, "j": 1} and RANDOM_K.parse("rand:1:None") is None
    assert [SCALE.name(s=s) for s in (0.5, 0.0, -1.0, 2.0)] == ["scale0.5", "scale0", "scale-1", "scale2"]
    assert [SCALE.parse(SCALE.name(s=s)) for s in (0.5, -1.0)] == [{"s": 0.5}, {"s": -1.0}]
    assert SCALE.key == "scale{s}" and SCALE.describe(weight="1:5:7") == "1:5:7 multiplied by s (nothing else changed)"
    assert TIMES.parse("x-0.5") == {"s": -0.5} and "spread8" not in TIMES and SPREAD.parse("spread8") == {"n": 8}
    assert TOP_K.parse("top:1:None") is None and TOP_CONTROL.parse("top:1:None") == {"layer": "1", "expert": "None"}
    broken = BROKEN(edit, weights="1:5:7, 1:9:3")
    assert BROKEN.parse("broken") == {} and ablated_weights(broken.description) == "1:5:7, 1:9:3"
    assert interventions([broken, c]) == {"broken": edit, "rand4_1": edit}
    assert descriptions([broken]) == {"broken": "ablate 1:5:7, 1:9:3"}


def test_no_intervention(model):
    before = snapshot(model)
    with NoIntervention() as n:
        assert n.active
        assert_identical(model, before)
    assert not n.active


# ------------------------------------------------------------------------------------------------ Spread

@pytest.mark.parametrize("col", [10, tiny.D_FF - 3])  # the second wraps past the last column
def test_spread_moves_value_over_next_columns(model, col):
    before = snapshot(model)
    layer, row, n = 1, 6, 8
    dp = down_projection(model, layer)
    original_row = dp.row(row)
    value = original_row[col].clone()
    targets = [(col + k) % tiny.D_FF for k in range(1, n + 1)]
    spread = Spread(model, WeightCoord(layer=layer, row=row, col=col), n=n)
    assert_identical(model, before)
    with spread:
        now = dp.row(row)
        assert now[col].item() == 0.0
        for c in targets:
            assert torch.equal(now[c], original_row[c] + value / n), c
        others = [c for c in range(tiny.D_FF) if c != col and c not in targets]
        assert torch.equal(now[others], original_row[others])
        torch.testing.assert_close(now.sum(), original_row.sum(), rtol=0, atol=1e-5)
        assert sum(changed_elements(model, before).values()) == n + 1
        # Nothing in other rows or layers moved.
        assert list(changed_elements(model, before)) == [dp.name + ".weight"]
    assert_identical(model, before)
    with pytest.raises(Boom):
        with spread:
            raise Boom()
    assert_identical(model, before)


def test_spread_rejects_bad_coordinates(model):
    before = snapshot(model)
    for bad in (WeightCoord(layer=0, row=0, col=tiny.D_FF), WeightCoord(layer=5, row=0, col=0)):
        with pytest.raises(CoordinateError):
            Spread(model, bad)
    assert_identical(model, before)


# ----------------------------------------------------------------------------------------------- Compose

def test_compose_applies_in_order_and_removes_in_reverse(model):
    before = snapshot(model)
    dp = down_projection(model, 0)
    w44, w45 = dp.get(4, 44), dp.get(4, 45)
    # Overlapping, non-commuting parts: double W[4, 45], then spread W[4, 44] onto columns 45..48.
    # In order that gives 2 * w45 + w44 / 4 (the reverse order would give 2 * (w45 + w44 / 4)), and removal
    # must unwind both edits of W[4, 45] to the original.
    combo = Compose(
        Ablation(model, [WeightCoord(layer=0, row=4, col=45, scale=2.0)]),
        Spread(model, WeightCoord(layer=0, row=4, col=44), n=4),
        Ablation(model, [WeightCoord(layer=1, row=9, col=9)]),
    )
    with combo:
        assert combo.active
        assert dp.get(4, 44).item() == 0.0
        assert torch.equal(dp.get(4, 45), w45 * 2.0 + w44 / 4)
        assert down_projection(model, 1).get(9, 9).item() == 0.0
    assert not combo.active
    assert_identical(model, before)
    with pytest.raises(Boom):
        with combo:
            raise Boom()
    assert_identical(model, before)
    with combo:  # reusable
        assert dp.get(4, 44).item() == 0.0
    assert_identical(model, before)


def test_compose_rolls_back_when_a_part_fails(model):
    before = snapshot(model)
    a = Ablation(model, [WeightCoord(layer=0, row=1, col=2)])
    combo = Compose(a, Ablation(model, [WeightCoord(layer=1, row=3, col=4)]), a)  # `a` twice: refused
    with pytest.raises(RuntimeError):
        with combo:
            pass
    assert not combo.active and not a.active
    assert_identical(model, before)


# ------------------------------------------------------------------------------------------------- Trace

def all_hooks(model) -> dict[str, tuple]:
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}


def test_trace_records_and_leaves_no_hooks(model):
    dps = down_projections(model)
    hooks_before = all_hooks(model)
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    modules = {f"l{dp.layer}": dp.module for dp in dps}
    with torch.no_grad():
        with Trace(modules, lambda name, inp, out: seen.append((name, inp[0], hidden(out)))) as t:
            assert all(len(dp.module._forward_hooks) == 1 for dp in dps)
            model(torch.arange(2, 12)[None])
        assert t is not None
    assert all(len(dp.module._forward_hooks) == 0 for dp in dps)
    assert all_hooks(model) == hooks_before
    assert [s[0] for s in seen] == ["l0", "l1"]
    for name, x, y in list(seen):
        assert x.shape[-1] == tiny.D_FF and y.shape[-1] == tiny.D_MODEL
        with torch.no_grad():
            torch.testing.assert_close(y, modules[name](x))
    assert len(seen) == 2  # calling the modules after exit records nothing


def test_trace_removes_hooks_after_exception(model):
    dps = down_projections(model)
    modules = {str(dp.layer): dp.module for dp in dps}
    hooks_before = all_hooks(model)
    with pytest.raises(Boom):
        with Trace(modules, lambda *a: None):
            raise Boom()
    assert all(len(dp.module._forward_hooks) == 0 for dp in dps)
    assert all_hooks(model) == hooks_before

    def explode(name, inp, out):
        raise Boom(name)

    with pytest.raises(Boom):
        with Trace(modules, explode):
            model(torch.arange(2, 8)[None])
    assert all(len(dp.module._forward_hooks) == 0 for dp in dps)
    assert all_hooks(model) == hooks_before
    # And a later forward pass is untouched by the old hooks.
    model(torch.arange(2, 8)[None])


def test_hidden():
    t = torch.ones(2)
    assert hidden(t) is t
    assert hidden((t, None)) is t
    assert hidden([t]) is t


# ------------------------------------------------------------------------------------------------ coords

@pytest.mark.parametrize(
    "text, expected",
    [
        ("11:507:1229", (11, 507, 1229, 0.0)),
        ("11:507:1229@0.5", (11, 507, 1229, 0.5)),
        ("1:2:3@-1", (1, 2, 3, -1.0)),
        ("1:2:3@2e-1", (1, 2, 3, 0.2)),
        ("0:0:0@+2", (0, 0, 0, 2.0)),
        ("1:2:3@.5", (1, 2, 3, 0.5)),
        (" 1:2:3 ", (1, 2, 3, 0.0)),
    ],
)
def test_parse_coord_accepts(text, expected):
    c = parse_coord(text)
    assert (c.layer, c.row, c.col, c.scale) == expected
    assert isinstance(c.scale, float)
    assert parse_coord(str(c)) == c  # str() round-trips


@pytest.mark.parametrize(
    "text", ["abc", "1:2", "1:2:3@x", "1:2:3@", "1:2:3:4:5", "1:x:2:3", "-1:2:3", "1:2:3@0.5@1", "1,2,3", "",
             "1:2:3@nan"]  # 1:2:3:4 is expert 2's weight 3:4 (tests/test_moe.py)
)
def test_parse_coord_rejects(text):
    with pytest.raises(CoordinateError) as err:
        parse_coord(text)
    assert "LAYER:ROW:COL" in str(err.value)
    assert isinstance(err.value, UsageError)


def test_parse_coords():
    coords = parse_coords(["11:507:1229", "11:507:1230@0.5", "2:507:1229"])
    assert [c.key for c in coords] == [(11, 507, 1229), (11, 507, 1230), (2, 507, 1229)]
    assert parse_coords([]) == []
    with pytest.raises(CoordinateError, match="more than once"):
        parse_coords(["1:2:3", "4:5:6", "1:2:3"])
    with pytest.raises(CoordinateError, match="more than once"):
        parse_coords(["1:2:3", "1:2:3@0.5"])  # same weight, different scale
    with pytest.raises(CoordinateError):
        parse_coords(["1:2:3", "bad"])


def test_weight_coord_str_and_key():
    assert str(WeightCoord(layer=1, row=2, col=3)) == "1:2:3"
    assert str(WeightCoord(layer=1, row=2, col=3, scale=0.5)) == "1:2:3@0.5"
    assert WeightCoord(layer=1, row=2, col=3, scale=0.5).key == (1, 2, 3)
    with pytest.raises(Exception):
        WeightCoord(layer=1, row=2, col=3).layer = 4  # frozen


# ------------------------------------------------------------------------------- known bugs (see report)

def test_compose_refused_reapply_keeps_the_live_intervention(model):
    dp = down_projection(model, 0)
    combo = Compose(Ablation(model, [WeightCoord(layer=0, row=1, col=40)]))
    with combo:
        with pytest.raises(RuntimeError):
            combo.apply()
        assert combo.active
        assert dp.get(1, 40).item() == 0.0  # still ablated inside the `with`


def test_spread_moves_the_value_the_weight_has_when_applied(model):
    dp = down_projection(model, 0)
    spread = Spread(model, WeightCoord(layer=0, row=3, col=40), n=4)
    dp.set(3, 40, 10.0)
    row_sum = dp.row(3).sum()
    with spread:
        assert dp.get(3, 40).item() == 0.0
        torch.testing.assert_close(dp.row(3).sum(), row_sum, rtol=0, atol=1e-5)
