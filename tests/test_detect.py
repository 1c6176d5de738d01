"""Detection on tiny random llamas with planted super weights (and without any)."""

from __future__ import annotations


import pytest
import torch

from superweight.core.arch import down_projections
from superweight.stages import detect
import tiny
from tiny import planted, tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PLANT_A = (1, 5, 7)
PLANT_B = (3, 20, 40)


def run(model, tok, calib, **kw):
    loaded = tiny.handle(model, tok)
    return detect.run_detect(loaded, detect.DetectConfig(max_length=128, **kw), ids=calib)


def coords(cands, confirmed_only=True):
    return {(c.layer, c.row, c.col) for c in cands if c.confirmed or not confirmed_only}


def test_planted_weight_is_found_and_confirmed_alone(tok, calib):
    result = run(planted(PLANT_A), tok, calib)
    assert coords(result.candidates) == {PLANT_A}
    top = result.candidates[0]
    assert (top.layer, top.row, top.col) == PLANT_A and top.value == 40.0
    assert top.source.startswith("spike")
    assert top.kl > 10 * max(top.control_kl_top, top.control_kl_random)


def test_two_planted_weights_are_both_found_by_iteration(tok, calib):
    result = run(planted(PLANT_A, PLANT_B), tok, calib, attribution=None)
    spikes = [c for c in result.candidates if c.source.startswith("spike")]
    assert coords(spikes, confirmed_only=False) == {PLANT_A, PLANT_B}
    assert coords(result.candidates) == {PLANT_A, PLANT_B}
    assert len(result.rounds) == 3  # found one, found the other, then nothing stood out


def test_unplanted_model_confirms_nothing(tok, calib):
    result = run(planted(), tok, calib)
    assert not any(c.confirmed for c in result.candidates)
    assert all(c.kl is not None for c in result.candidates)  # attribution candidates were still verified


def test_forced_candidates_on_unplanted_model_are_rejected_by_controls(tok, calib):
    # spike_ratio 1 turns every layer into a "candidate": verification must still confirm none.
    result = run(planted(), tok, calib, spike_ratio=1.0, attribution=None, max_candidates=3)
    assert len(result.candidates) == 3
    assert not any(c.confirmed for c in result.candidates)


def test_scan_reports_the_writer_column_and_its_layer(tok):
    model = planted(PLANT_A)
    spikes = detect.scan(model, tok, detect.DEFAULT_PROMPTS[:1])
    assert len(spikes) == 6
    s = spikes[1]
    assert (s.out_row, s.col, s.in_col) == (5, 7, 7)
    assert s.share > 0.9  # the planted weight wrote almost all of the spike


@pytest.mark.parametrize("method", ["activation", "gradient"])
def test_attribution_scores_and_leaves_the_model_untouched(tok, calib, method):
    model = planted(PLANT_A)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    top = detect.attribution(model, calib[:256], method, top=3, max_length=128)
    assert len(top) == 3 and top[0].attribution >= top[1].attribution >= top[2].attribution > 0
    if method == "activation":
        # |W| * max|x| sees the plant. (First-order |w * dL/dw| need not: the massive activation it writes
        # saturates the next RMSNorm, so the local gradient is small although zeroing it does damage.)
        assert (top[0].layer, top[0].row, top[0].col) == PLANT_A
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(dp.weight.grad is None for dp in down_projections(model))


def test_published_coordinates_are_reported(tok, calib):
    loaded = tiny.handle(planted(PLANT_A), tok, spec="smollm2-135m", source="m")
    # The tiny model is not SmolLM2, so its published weight (layer 11) is out of range: reported, not found.
    result = detect.run_detect(loaded, detect.DetectConfig(max_length=128, attribution=None), ids=calib)
    assert result.published == [{"layer": 11, "row": 507, "col": 1229, "detected": False, "confirmed": False}]


@pytest.mark.parametrize("family", sorted(__import__("tiny").FAMILIES))
def test_detect_runs_on_every_family_and_restores_the_model(family, tok, calib):
    model = tiny_model(family, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run(model, tok, calib[:256], max_candidates=2, attribution_top=2)
    assert result.candidates and all(c.kl is not None for c in result.candidates)
    assert len(result.rounds[0]) == len(down_projections(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_planted_weight_in_gpt2_conv1d_is_found_at_the_right_coordinate(tok, calib):
    model = tiny_model("gpt2", seed=0, num_hidden_layers=6, initializer_range=0.2)
    layer, row, col = PLANT_A
    with torch.no_grad():
        model.transformer.h[layer].mlp.c_fc.weight[:, col] *= 8  # Conv1D: [d_model, d_ff]
    down_projections(model)[layer].set(row, col, 40.0)  # stored as c_proj.weight[col, row]
    assert model.transformer.h[layer].mlp.c_proj.weight[col, row] == 40.0
    result = run(model, tok, calib, attribution=None)
    assert coords(result.candidates) == {PLANT_A}
