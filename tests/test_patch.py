"""intervene.RowPatch and intervene.ActivationRestore: exact rank-one row edits via hooks, and the
paper's activation-restore baseline, on tiny models (Linear, GPT-2's transposed Conv1D, OPT's flattened MLP)."""

from __future__ import annotations

import pytest
import torch

import tiny
from tiny import assert_identical, hook_count, planted, snapshot
from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord
from superweight.core.intervene import ActivationRestore, Ablation, RowPatch, Trace
from superweight.errors import CoordinateError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FAMILIES = ["llama", "gpt2", "opt"]  # nn.Linear, Conv1D (weight stored transposed), Linear fed [B*T, d_ff]
IDS = torch.randint(2, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def rand_vec(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def rand_input(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- RowPatch


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(2, 5), (7,)], ids=["3d", "flat"])  # [B, T, d_ff] and OPT-style [N, d_ff]
def test_rowpatch_adds_x_dot_d_to_its_row_only(family, shape):
    model = tiny.tiny_model(family, seed=3)
    dp = down_projection(model, 1)
    row = 17
    d = rand_vec(dp.d_ff, 1)
    x = rand_input((*shape, dp.d_ff), 2)
    with torch.no_grad():
        base = dp.module(x)
        with RowPatch(model, [(1, row)], [d]):
            patched = dp.module(x)
    assert patched.shape == base.shape == (*shape, dp.d_model)
    others = [c for c in range(dp.d_model) if c != row]
    assert torch.equal(patched[..., others], base[..., others])
    expected = base[..., row] + x @ d
    assert not torch.allclose(patched[..., row], base[..., row])
    torch.testing.assert_close(patched[..., row], expected, rtol=1e-6, atol=1e-5)


def test_rowpatch_on_opt_sees_the_flattened_fc2_input_in_a_full_forward():
    model = tiny.tiny_model("opt", seed=3)
    dp = down_projection(model, 0)
    row, d = 9, rand_vec(dp.d_ff, 4)
    seen = {}

    def record(name, inp, out):
        seen[name] = (inp[0].detach().clone(), out.detach().clone())

    with torch.no_grad():
        with Trace({"base": dp.module}, record):
            model(input_ids=IDS)
        patch = RowPatch(model, [(0, row)], [d])
        with patch, Trace({"patched": dp.module}, record):  # Trace's hook runs after the patch's
            model(input_ids=IDS)
    x, base = seen["base"]
    assert x.dim() == 2 and x.shape == (IDS.numel(), dp.d_ff)  # OPT flattens [B, T] before fc1/fc2
    assert torch.equal(seen["patched"][0], x)  # layer 0's input is upstream of the patch
    out = seen["patched"][1]
    others = [c for c in range(dp.d_model) if c != row]
    assert torch.equal(out[:, others], base[:, others])
    torch.testing.assert_close(out[:, row], base[:, row] + x @ d, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_of_the_ablated_weight_restores_the_intact_logits(family):
    model = tiny.tiny_model(family, seed=5)
    layer, row, col = 1, 6, 21
    dp = down_projection(model, layer)
    dp.set(row, col, 3.0)  # a weight big enough that zeroing it visibly changes the logits
    w = float(dp.get(row, col))
    before = snapshot(model)
    with torch.no_grad():
        intact = model(input_ids=IDS).logits
        coords = [WeightCoord(layer=layer, row=row, col=col)]
        with Ablation(model, coords):
            broken = model(input_ids=IDS).logits
            vec = torch.zeros(dp.d_ff)
            vec[col] = w - 0.0
            with RowPatch(model, [(layer, row)], [vec]):
                repaired = model(input_ids=IDS).logits
    assert (broken - intact).abs().max() > 1e-2
    torch.testing.assert_close(repaired, intact, rtol=1e-5, atol=1e-5)
    assert hook_count(model) == 0
    assert_identical(model, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_leaves_no_hooks_and_the_weights_untouched(family):
    model = tiny.tiny_model(family, seed=1)
    assert hook_count(model) == 0
    before = snapshot(model)
    patch = RowPatch(model, [(0, 2), (0, 30), (1, 2)], [rand_vec(tiny.D_FF, s) for s in range(3)])
    assert hook_count(model) == 0 and not patch.active  # construction registers nothing
    patch.apply()
    assert patch.active and hook_count(model) == 2  # one hook per patched layer
    with pytest.raises(RuntimeError):
        patch.apply()
    with torch.no_grad():
        model(input_ids=IDS)
    patch.remove()
    assert not patch.active and hook_count(model) == 0
    assert_identical(model, before)
    # Reusable after removal, and removed even when the block raises.
    with pytest.raises(ZeroDivisionError):
        with patch:
            assert hook_count(model) == 2
            1 / 0
    assert hook_count(model) == 0 and not patch.active
    assert_identical(model, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_the_patch_vectors(family):
    model = tiny.tiny_model(family, seed=2)
    patch = RowPatch(model, [(0, 4), (1, 4), (1, 11)])
    assert all(v.requires_grad and v.dtype == torch.float32 and torch.equal(v, torch.zeros(tiny.D_FF))
               for v in patch.parameters())
    with patch:
        loss = model(input_ids=IDS).logits.float().pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in patch.vectors)


def test_gradient_of_a_row_is_the_summed_input():
    model = tiny.tiny_model("llama", seed=2)
    dp = down_projection(model, 0)
    patch = RowPatch(model, [(0, 4), (0, 11)], [rand_vec(dp.d_ff, 7), rand_vec(dp.d_ff, 8)])
    x = rand_input((3, 4, dp.d_ff), 9)
    with patch:
        dp.module(x)[..., 11].sum().backward()
    torch.testing.assert_close(patch.vectors[1].grad, x.sum((0, 1)), rtol=1e-6, atol=1e-5)
    assert torch.equal(patch.vectors[0].grad, torch.zeros(dp.d_ff))  # row 4 was not in the loss


@pytest.mark.parametrize("family", FAMILIES)
def test_several_rows_in_one_layer_and_across_layers(family):
    model = tiny.tiny_model(family, seed=4, num_hidden_layers=3)
    rows = [(0, 3), (0, 17), (2, 3), (2, 31), (2, 0)]
    vecs = [rand_vec(tiny.D_FF, 10 + i) for i in range(len(rows))]
    x = rand_input((2, 5, tiny.D_FF), 11)
    dps = [down_projection(model, i) for i in range(3)]
    with torch.no_grad():
        base = [dp.module(x) for dp in dps]
        with RowPatch(model, rows, vecs):
            patched = [dp.module(x) for dp in dps]
    for layer in range(3):
        expected = base[layer].clone()
        for (lyr, row), v in zip(rows, vecs):
            if lyr == layer:
                expected[..., row] += x @ v
        torch.testing.assert_close(patched[layer], expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(patched[1], base[1])  # an unpatched layer is untouched
    assert hook_count(model) == 0


@pytest.mark.parametrize(
    "rows, vectors",
    [
        ([(0, tiny.D_MODEL)], None),  # row past d_model
        ([(0, -1)], None),
        ([(tiny.N_LAYERS, 0)], None),  # no such layer
        ([(0, 3), (0, 3)], None),  # the same row twice
        ([(0, 3)], [torch.zeros(tiny.D_MODEL)]),  # d_model-long vector (the transposed mistake)
        ([(0, 3)], [torch.zeros(1, tiny.D_FF)]),
        ([(0, 3)], [torch.zeros(tiny.D_FF + 1)]),
        ([(0, 3), (1, 3)], [torch.zeros(tiny.D_FF)]),  # too few vectors
        ([(0, 3)], [torch.zeros(tiny.D_FF)] * 2),  # too many
    ],
)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bad_rows_and_vectors_raise_coordinate_error(family, rows, vectors):
    model = tiny.tiny_model(family, seed=0)
    with pytest.raises(CoordinateError):
        RowPatch(model, rows, vectors)
    assert hook_count(model) == 0


# ------------------------------------------------------------------------------------- ActivationRestore

PLANT = (1, 5, 7)


@pytest.fixture(scope="module")
def restore_runs():
    """Logits and the layer's down-projection (input, output) for intact / broken / restored passes."""
    model = planted(PLANT)
    layer, row, col = PLANT
    dp = down_projection(model, layer)
    coords = [WeightCoord(layer=layer, row=row, col=col)]
    ids = torch.randint(2, 384, (3, 32), generator=torch.Generator().manual_seed(1))
    before = snapshot(model)
    seen, logits = {}, {}

    def record(name, inp, out):
        seen[name] = (inp[0].detach().clone(), out.detach().clone())

    runs = {
        "intact": lambda: [],
        "broken": lambda: [Ablation(model, coords)],
        "all": lambda: [Ablation(model, coords), ActivationRestore(model, coords, [40.0], fraction=0.0)],
        "some": lambda: [Ablation(model, coords), ActivationRestore(model, coords, [40.0])],
    }
    with torch.no_grad():
        for name, make in runs.items():
            parts = make()
            for p in parts:
                p.apply()
            try:
                with Trace({name: dp.module}, record):
                    logits[name] = model(input_ids=ids).logits
            finally:
                for p in reversed(parts):
                    p.remove()
    assert hook_count(model) == 0
    assert_identical(model, before)
    return logits, seen


def test_restore_everywhere_equals_the_intact_model(restore_runs):
    logits, seen = restore_runs
    assert (logits["broken"] - logits["intact"]).abs().max() > 1.0  # the planted weight matters
    torch.testing.assert_close(logits["all"], logits["intact"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["all"][1], seen["intact"][1], rtol=1e-5, atol=1e-3)


def test_default_fraction_restores_only_the_massive_positions(restore_runs):
    logits, seen = restore_runs
    _, row, col = PLANT
    x, intact = seen["intact"]
    broken, some = seen["broken"][1], seen["some"][1]
    assert torch.equal(seen["some"][0], x)  # the ablated layer's input is upstream of every edit
    own = (x[..., col] * 40.0).abs()
    where = own >= 0.1 * own.max()
    assert 0 < int(where.sum()) < where.numel()  # the test only means something if both kinds exist
    # Channel `row`: intact where restored, broken elsewhere; every other channel is the broken model's.
    torch.testing.assert_close(some[..., row][where], intact[..., row][where], rtol=1e-5, atol=1e-3)
    assert torch.equal(some[..., row][~where], broken[..., row][~where])
    others = [c for c in range(some.shape[-1]) if c != row]
    assert torch.equal(some[..., others], broken[..., others])
    top = own.flatten().argmax()
    torch.testing.assert_close(some[..., row].flatten()[top], intact[..., row].flatten()[top], rtol=1e-6, atol=1e-3)
    assert (some[..., row].flatten()[top] - broken[..., row].flatten()[top]).abs() > 100
    # Restoring only some positions gives logits that are neither the broken nor the intact model's.
    assert (logits["some"] - logits["broken"]).abs().max() > 1e-2
    assert (logits["some"] - logits["intact"]).abs().max() > 1e-2


def test_activation_restore_rejects_bad_coordinates():
    model = tiny.tiny_model("llama", seed=0)
    with pytest.raises(CoordinateError):
        ActivationRestore(model, [WeightCoord(layer=0, row=0, col=tiny.D_FF)], [1.0])
    with pytest.raises(CoordinateError):
        ActivationRestore(model, [WeightCoord(layer=9, row=0, col=0)], [1.0])
    assert hook_count(model) == 0
