"""`superweight quantize`: the quantizers (core/quant.py), the bit-exact quantize-and-restore interventions
(core/fakequant.py), the condition ordering on a planted super weight, and the command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from superweight.cli import app
from superweight.core.coords import WeightCoord
from superweight.core.fakequant import QuantizedInputs, QuantizedWeights, symmetric_rtn
from superweight.core.quant import (
    NF4, Clip, QuantSpec, effective_bits, fake_quantize, parse_bits, parse_blocks, parse_clip,
)
from superweight.errors import UsageError
from tiny import assert_identical, hook_count, planted, snapshot, tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")
PLANT = WeightCoord(layer=1, row=5, col=7)


def _matrix(seed=0, out=8, inn=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inn, generator=g)


# ----------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block", [4, 16, 32, "channel", "tensor"])
def test_int_rtn_has_at_most_2_to_the_bits_levels_per_block_and_keeps_min_and_max(bits, block):
    w = _matrix()
    q, stats = fake_quantize(w, QuantSpec(bits, block))
    size = {"channel": 16, "tensor": 128}.get(block, block)
    for a, b in zip(w.reshape(-1, size), q.reshape(-1, size)):
        assert len(set(b.tolist())) <= 2 ** bits
        assert torch.allclose(b.min(), a.min(), atol=1e-6) and torch.allclose(b.max(), a.max(), atol=1e-6)
        step = (a.max() - a.min()) / (2 ** bits - 1)
        assert (b - a).abs().max() <= step / 2 + 1e-5  # round to nearest
    assert stats.n_groups == 128 // size and stats.n_weights == 128


def test_a_block_is_consecutive_weights_of_the_row_major_matrix_and_a_partial_block_stands_alone():
    w = _matrix()
    row16, _ = fake_quantize(w, QuantSpec(4, 16))
    channel, _ = fake_quantize(w, QuantSpec(4, "channel"))
    assert torch.equal(row16, channel)  # 16 = one row
    q, stats = fake_quantize(w, QuantSpec(4, 48))  # 128 = 2 x 48 + 32
    assert stats.n_groups == 3
    tail, _ = fake_quantize(w.reshape(-1)[96:].reshape(2, 16), QuantSpec(4, "tensor"))
    assert torch.equal(q.reshape(-1)[96:], tail.reshape(-1))


def test_nf4_maps_each_block_onto_the_qlora_levels():
    w = _matrix()
    q, _ = fake_quantize(w, QuantSpec(4, 16, "nf"))
    for a, b in zip(w, q):
        lo, hi = a.min(), a.max()
        t = (b - lo) / (hi - lo) * 2 - 1
        assert all(min(abs(x - lv) for lv in NF4) < 1e-5 for x in t.tolist())


def test_hold_keeps_the_weight_exact_and_takes_the_block_range_without_it():
    w = _matrix()
    w[3, 5] = 20.0
    plain, p_stats = fake_quantize(w, QuantSpec(4, 16), keep=[(3, 5)])
    held, h_stats = fake_quantize(w, QuantSpec(4, 16), keep=[(3, 5)], mode="hold")
    # The caution: under min-max RTN the super weight is its block's max, so plain RTN already stores it exactly;
    # holding it out changes the other weights of its block (a finer step), not the weight itself.
    assert plain[3, 5] == 20.0 and held[3, 5] == 20.0
    assert h_stats.kept[0].step < p_stats.kept[0].step / 3
    assert h_stats.kept[0].block_rmse < p_stats.kept[0].block_rmse / 3
    others = torch.ones(16, dtype=torch.bool)
    others[5] = False
    expect, _ = fake_quantize(w[3][others].reshape(1, 15), QuantSpec(4, "tensor"))
    assert torch.equal(held[3][others], expect.reshape(-1))
    assert torch.equal(held[:3], plain[:3])  # other blocks untouched by the hold


def test_clipping_destroys_the_outlier_and_restore_writes_it_back():
    w = _matrix()
    w[3, 5] = 20.0
    clipped, c_stats = fake_quantize(w, QuantSpec(4, 16, clip=Clip("tensor", 0.01)), keep=[(3, 5)])
    restored, r_stats = fake_quantize(w, QuantSpec(4, 16, clip=Clip("tensor", 0.01)), keep=[(3, 5)], mode="restore")
    assert c_stats.n_clipped == r_stats.n_clipped == 1  # int(0.01 * 128) weights
    assert clipped[3, 5] < 5 and restored[3, 5] == 20.0
    assert torch.equal(clipped[:3], restored[:3]) and torch.equal(clipped[4:], restored[4:])


@pytest.mark.parametrize("clip, expected", [(Clip("zscore", 0.0), 50), (Clip("iqr", 0.0), 25), (Clip("block", 0.25), 25), (Clip("tensor", 0.03), 3)])
def test_per_block_clip_methods_clip_about_their_share(clip, expected):
    w = torch.arange(1, 101, dtype=torch.float32).reshape(1, 100)
    _q, stats = fake_quantize(w, QuantSpec(4, "tensor", clip=clip))
    assert abs(stats.n_clipped - expected) <= 1, stats.n_clipped


def test_effective_bits_count_scales_zeros_and_kept_outliers():
    assert effective_bits(4, [(64, 64)], 64) == 4.5
    assert effective_bits(4, [(64, 64)], "channel") == 4.5
    assert effective_bits(4, [(64, 64)], "tensor") == 4 + 32 / 4096
    assert effective_bits(4, [(64, 64)], 64, n_kept=2) == 4.5 + 96 / 4096


@pytest.mark.parametrize("fn, text, message", [
    (parse_bits, "9", "invalid --bits '9'"), (parse_bits, "1,4", "invalid --bits"), (parse_bits, "x", "invalid --bits"),
    (parse_blocks, "0", "invalid --block '0'"), (parse_blocks, "row", "invalid --block 'row'"),
    (parse_clip, "magic:1", "unknown --clip method 'magic'"), (parse_clip, "tensor:2", "between 0 and 1"),
    (parse_clip, "iqr:x", "iqr needs a number"),
])
def test_bad_options_name_the_option(fn, text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        fn(text)


# ----------------------------------------------------------------------------- interventions restore exactly
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("eager", [False, True])
def test_quantized_weights_restore_every_weight_bit_for_bit(family, eager):
    model = tiny_model(family, seed=3)
    before, hooks = snapshot(model), hook_count(model)
    ids = torch.arange(40).view(2, 20) % 300
    ref = model(input_ids=ids).logits
    q = QuantizedWeights(model, QuantSpec(3, 16, clip=Clip("tensor", 0.01)), [WeightCoord(layer=1, row=5, col=7)],
                         mode="restore", eager=eager)
    with q:
        out = model(input_ids=ids).logits
        out2 = model(input_ids=ids).logits
    assert not torch.equal(out, ref) and torch.equal(out, out2)
    assert_identical(model, before)
    assert hook_count(model) == hooks
    assert len(q.stats) == len(q.targets) and q.n_clipped() > 0
    assert torch.equal(model(input_ids=ids).logits, ref)


def test_a_layer_runs_with_exactly_the_quantized_weight_and_a_failed_pass_still_restores():
    model = tiny_model("llama", seed=1)
    before = snapshot(model)
    spec = QuantSpec(4, 32)
    down = model.model.layers[0].mlp.down_proj
    seen = []
    with QuantizedWeights(model, spec):  # a pre-hook registered after the intervention's runs after it
        handle = down.register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
        try:
            model(input_ids=torch.arange(10).view(1, 10))
        finally:
            handle.remove()
    assert torch.equal(seen[0], fake_quantize(before["model.layers.0.mlp.down_proj.weight"], spec)[0])

    def boom(*_):
        raise RuntimeError("boom")

    handle = down.register_forward_hook(boom)  # raises after the pre-hook quantized, before the restore hook
    try:
        with pytest.raises(RuntimeError), QuantizedWeights(model, spec):
            model(input_ids=torch.arange(10).view(1, 10))
    finally:
        handle.remove()
    assert_identical(model, before)


def test_quantized_inputs_hold_the_super_activation_and_leave_no_hook():
    x = torch.randn(2, 5, 64)
    x[0, 0, 7] = 500.0
    q = symmetric_rtn(x, 8)
    held = symmetric_rtn(x, 8, [7])
    assert torch.equal(held[..., 7], x[..., 7])
    others = [c for c in range(64) if c != 7]
    assert (held[..., others] - x[..., others]).abs().max() < (q[..., others] - x[..., others]).abs().max() / 10
    model = planted((1, 5, 7))
    hooks, before = hook_count(model), snapshot(model)
    with QuantizedInputs(model, 8, "all", hold=[PLANT]):
        model(input_ids=torch.arange(12).view(1, 12))
    assert hook_count(model) == hooks
    assert_identical(model, before)


# ----------------------------------------------------------------------------- conditions, in order
def test_condition_ordering_on_a_planted_super_weight(tiny_model_dir):
    """Clipping the planted super weight does more damage than plain RTN, and restoring it undoes most of that;
    holding it out of its block helps per tensor (where one outlier stretches a range of 2,048 weights)."""
    from superweight.io.models import Loaded
    from superweight.stages.quantize import QuantizeConfig, run_quantize
    from tiny import tiny_tokenizer

    loaded = Loaded(model=planted((1, 5, 7)), tokenizer=tiny_tokenizer(), spec="planted", source="planted",
                    dtype="fp32", device="cpu")
    before = snapshot(loaded.model)
    r = run_quantize(loaded, QuantizeConfig(bits=[4], blocks=[16, "tensor"], clip=Clip("tensor", 0.001), keep=[PLANT],
                                            max_tokens=512, max_length=64))
    assert_identical(loaded.model, before)
    kl = {row.name: row.kl for row in r.rows}
    for block, worse in (("16", 1.5), ("tensor", 1.05)):  # per tensor, plain RTN is already poor
        assert kl[f"4b/{block}/clip"] > worse * kl[f"4b/{block}/rtn"], kl
        assert kl[f"4b/{block}/clip+restore"] < 0.7 * kl[f"4b/{block}/clip"], kl
    assert kl["4b/tensor/held"] < kl["4b/tensor/rtn"], kl
    row = {x.name: x for x in r.rows}
    assert row["4b/16/rtn"].kept[0].own_error < 1e-5  # the block max: stored exactly by min-max RTN
    assert row["4b/16/clip"].kept[0].own_error > 30  # 40 clipped to the 99.9th percentile
    assert "block-mates' step" in row["4b/16/held"].changes and "the weight itself" in row["4b/16/clip"].changes
    # int(0.001 x size) per matrix: 6 layers x (q 1, k 0, v 0, o 1, gate 2, up 2, down 2)
    assert row["4b/16/clip"].n_clipped == 48 and row["4b/16/rtn"].n_clipped == 0
    assert math.isclose(row["4b/16/held"].effective_bits, 4 + 2 + 48 / r.n_weights)
    assert [f.title for f in r.report.figures] == ["4-bit INT RTN: PPL by block size"]


# ----------------------------------------------------------------------------- the command
def test_quantize_command_writes_json_and_plot(planted_dir, tmp_path):
    out, png = tmp_path / "q.json", tmp_path / "q.png"
    result = CliRunner().invoke(app, [
        "quantize", "--model", str(planted_dir), "--keep", "1:5:7", "--bits", "4", "--block", "32,channel",
        "--clip", "block:0.05", "--activations", "int8", "--max-tokens", "256", "--max-length", "64",
        "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["rows"]] == [f"4b/{b}/{c}" for b in ("32", "channel")
                                                for c in ("rtn", "held", "clip", "clip+restore")]
    assert [a["name"] for a in doc["activations"]] == ["a8/down", "a8/down+hold-sa"]
    assert doc["keep"] == ["1:5:7"] and doc["keep_source"] == "given"
    assert doc["report"]["figures"][0]["log_y"] and png.read_bytes()[:4] == b"\x89PNG"
    assert "4b/32/clip+restore" in result.stdout


@pytest.mark.parametrize("args, pattern", [
    (["--bits", "9"], r"invalid --bits '9': each must be an integer from 2 to 8"),
    (["--block", "7"], r"invalid --block 7: it divides none of the quantized matrices"),
    (["--clip", "magic:1"], r"unknown --clip method 'magic'"),
    (["--keep", "1:2"], r"invalid --keep: invalid weight coordinate '1:2'"),
    (["--keep", "1:99:0"], r"row 99 out of range"),
    (["--activations", "fp4"], r"invalid --activations 'fp4'"),
])
def test_quantize_bad_input_is_one_line(tiny_model_dir, args, pattern):
    import re

    result = CliRunner().invoke(app, ["quantize", "--model", str(tiny_model_dir), "--dtype", "fp32", *args])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr


def test_run_quantize_adds_a_report_section_and_quantize_patch_scores_the_repaired_model(planted_dir, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "--model", str(planted_dir), "--weight", "1:5:7", "--steps", "3", "--eval-tokens", "256",
        "--analysis-tokens", "128", "--draws", "1", "--no-baselines", "--quantize", "--out", str(run),
        "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    doc = json.loads((run / "quantize.json").read_text())
    assert doc["keep"] == ["1:5:7"] and doc["keep_source"] == "given"
    assert {r["block"] for r in doc["rows"]} == {"64", "128", "256", "channel"}
    page = (run / "report.html").read_text()
    assert "<h2>Quantization</h2>" in page and 'alt="PPL against block size' in page
    assert (run / "plots" / "quantize.png").is_file()
    assert "## Quantization" in (run / "report.md").read_text()

    out = tmp_path / "patched.json"
    model_before = {p.name: p.read_bytes() for p in planted_dir.iterdir() if p.is_file()}
    result = CliRunner().invoke(app, [
        "quantize", "--model", str(planted_dir), "--patch", str(run), "--keep", "1:5:7", "--bits", "4",
        "--block", "32", "--clip", "none", "--max-tokens", "256", "--max-length", "64", "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["rows"]] == ["4b/32/rtn", "4b/32/held"]  # --clip none: no clipped conditions
    assert [r["name"] for r in doc["patched_rows"]] == ["4b/32/patched-rtn", "4b/32/patched-merged"]
    assert doc["patched"]["kl"] > 0
    merged, side = doc["patched_rows"][1], doc["patched_rows"][0]
    assert merged["kl"] != side["kl"]  # quantizing the patch's row is a different model
    assert {p.name: p.read_bytes() for p in planted_dir.iterdir() if p.is_file()} == model_before


def test_damaging_outliers_rank_the_planted_super_weight_first_and_only_pick_clipped_weights():
    from superweight.core.arch import down_projection, linear_matrix
    from superweight.stages.quantize import damaging_outliers, input_absmax

    model = planted((1, 5, 7))
    xmax = input_absmax(model, torch.arange(128) % 300, max_length=64)
    spec = QuantSpec(4, 16, clip=Clip("tensor", 0.001))
    ranked = damaging_outliers(model, spec, xmax, 5)
    down = down_projection(model, 1).module
    assert ranked[0] == (down, 5, 7)
    assert len(ranked) == 5 and len(set(ranked)) == 5
    for module, r, c in ranked:  # each one is among the int(0.001 x size) largest |w| of its matrix
        w = linear_matrix(module).abs()
        k = int(0.001 * w.numel())
        assert k >= 1 and w[r, c] >= w.reshape(-1).topk(k).values[-1]
    assert (down, 5, 7) not in damaging_outliers(model, spec, xmax, 5, exclude=[PLANT])


def test_quantize_tasks_score_each_condition_and_restore_the_model(planted_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from pathlib import Path

    tasks = Path(__file__).parent / "data" / "tasks"
    out = tmp_path / "t.json"
    result = CliRunner().invoke(app, [
        "quantize", "--model", str(planted_dir), "--keep", "1:5:7", "--bits", "3", "--block", "tensor",
        "--clip", "tensor:0.001", "--max-tokens", "128", "--max-length", "64", "--tasks", "superweight_easy_mc",
        "--include-path", str(tasks), "--task-limit", "8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())["tasks"]["scores"]
    assert list(scores) == ["base", "3b/tensor/rtn", "3b/tensor/held", "3b/tensor/clip", "3b/tensor/clip+restore"]
    values = {c: {m: v["value"] for m, v in s["superweight_easy_mc"].items()} for c, s in scores.items()}
    # Each condition is applied for its own pass: 3-bit per-tensor RTN scores differently from base (measured
    # acc_norm 0.25 -> 0.125 on the 8 items), and quantizing does not touch what base is scored on.
    assert any(v != values["base"] for c, v in values.items() if c != "base"), values
