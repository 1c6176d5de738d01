"""Mixture-of-experts models (core/moe.py): expert coordinates, fused expert views, routed inputs, expert pruning,
and a planted super expert in every MoE family found by detect, confirmed by pruning its expert and repaired."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

import tiny
from superweight.core import arch, moe
from superweight.core.coords import WeightCoord, parse_coord, parse_coords, parse_row, row_text, rows_of, split_row
from superweight.core.intervene import Ablation, Compose, ExpertPrune, RowPatch, Trace
from superweight.core.patching import apply_patch, merge_into_weights
from superweight.errors import CoordinateError, UnsupportedArchitectureError, UsageError
from superweight.io import corpora
from superweight.schema.detect import Candidate
from superweight.io.patchfile import load_patch, save_patch
from superweight.io.peft import adapter_tensors
from superweight.schema.record import DetectSummary, RowGeometry
from superweight.measure.metrics import measure
from superweight.measure.recovery import recovery
from superweight.stages import detect
from superweight.engine.patch import space_units
from superweight.engine.config import RECIPES
from superweight.engine.train import train, training_sequences
from tiny import assert_identical, hook_count, planted_expert, snapshot, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FAMILIES = sorted(tiny.MOE_FAMILIES)
PLANTS = [(f, 2) for f in FAMILIES] + [("qwen2_moe", "shared")]  # (family, expert): a routed one, and a shared one
# The families beyond the four the issue names, where the tiny plant is weaker: FlexOlmo normalises the MoE output
# (a post-norm, so scaling the other experts down does not quiet them: pruning one costs ~0.3 nats), and the
# full-attention tiny Qwen3-Next / Qwen3.5-MoE lose ~0.05 nats to any pruned expert and ~0.45 to the super weight.
# There the planted weight is still found and confirmed, its expert does the most damage, and both are repaired;
# the super-weight grade, the factor 10 over the control experts and 100% router picks are asserted for the others.
WEAKER = {"flex_olmo", "qwen3_next", "qwen3_5_moe_text"}
IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _loaded(model, tok):
    return tiny.handle(model, tok)


# ------------------------------------------------------------------------------------------ storage and views
def test_tiny_covers_every_moe_family():
    assert set(tiny.MOE_FAMILIES) == set(arch.MOE_FAMILIES) == set(moe.MOE_FAMILIES)
    assert not set(arch.MOE_FAMILIES) & set(arch.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_storage_and_one_view_per_expert(family):
    model = tiny_model(family, num_hidden_layers=3)
    assert arch.family(model) == family and arch.is_moe(model)
    experts = model.model.layers[0].mlp.experts
    # transformers 5 fuses the experts: 3-D parameters, [n_experts, d_model, d_ff] in nn.Linear's [out, in] order.
    assert tuple(experts.down_proj.shape) == (tiny.N_EXPERTS, tiny.D_MODEL, tiny.D_FF)
    assert tuple(experts.gate_up_proj.shape) == (tiny.N_EXPERTS, 2 * tiny.D_FF, tiny.D_MODEL)
    shared = moe.MOE_FAMILIES[family].shared is not None
    dps = arch.down_projections(model)
    assert len(dps) == 3 * (tiny.N_EXPERTS + shared)
    for dp in dps:
        if dp.expert == "shared":
            assert dp.module is model.get_submodule(dp.name) is model.model.layers[dp.layer].mlp.shared_expert.down_proj
            assert (dp.d_model, dp.d_ff) == (tiny.D_MODEL, tiny.SHARED_FF)
        else:
            assert isinstance(dp, arch.ExpertDownProj) and dp.module is model.model.layers[dp.layer].mlp.experts
            assert dp.name == f"model.layers.{dp.layer}.mlp.experts.down_proj[{dp.expert}]"
            assert dp.matrix.data_ptr() == dp.weight[dp.expert].data_ptr()  # a view, no copy
            assert (dp.d_model, dp.d_ff) == (tiny.D_MODEL, tiny.D_FF)
    info = arch.describe(model)
    assert (info.n_layers, info.n_experts, info.d_model, info.d_ff) == (3, tiny.N_EXPERTS, tiny.D_MODEL, tiny.D_FF)


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_inputs_rebuild_the_experts_output(family):
    """Sum over experts of routed input @ W_e^T is what the fused experts module returns, whatever kernel it runs."""
    model = tiny_model(family)
    dps = [dp for dp in arch.down_projections(model) if dp.layer == 1 and isinstance(dp.expert, int)]
    seen = {}

    def check(args, out):
        xs = [dp.inputs(args) for dp in dps]
        seen["sum"] = sum(dp.outputs(x, out) for dp, x in zip(dps, xs))
        seen["out"], seen["zeros"] = out, [(x == 0).all(-1) for x in xs]
        seen["index"] = args[1]

    with Trace({"experts": dps[0].module}, lambda _name, args, out: check(args, out)):
        model(input_ids=IDS)
    torch.testing.assert_close(seen["sum"], seen["out"], atol=1e-6, rtol=1e-5)
    for e, zero in enumerate(seen["zeros"]):  # an expert reads nothing at the tokens not routed to it
        assert torch.equal(~zero, (seen["index"] == e).any(-1))


def test_dense_layers_of_an_moe_model_keep_their_mlp():
    model = tiny_model("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])
    dp = arch.down_projection(model, 1)
    assert dp.expert is None and dp.module is model.model.layers[1].mlp.down_proj
    assert [d.expert for d in arch.down_projections(model) if d.layer == 1] == [None]
    assert arch.moe_block(model, 1) is None and arch.moe_block(model, 0) is not None


# ----------------------------------------------------------------------------------------------- coordinates
def test_expert_coordinates_parse_print_and_key():
    c = parse_coord("3:17:5:7@0.5")
    assert (c.layer, c.expert, c.row, c.col, c.scale) == (3, 17, 5, 7, 0.5)
    assert str(c) == "3:17:5:7@0.5" and parse_coord(str(c)) == c and c.key == (3, 17, 5, 7)
    s = parse_coord("3:shared:5:7")
    assert s.expert == "shared" and str(s) == "3:shared:5:7" and s.key == (3, "shared", 5, 7)
    dense = parse_coord("3:5:7")
    assert dense.expert is None and dense.key == (3, 5, 7) and str(dense) == "3:5:7"
    assert "expert" not in json.dumps(dense.model_dump(exclude_none=True))
    assert len(parse_coords(["0:1:5:7", "0:2:5:7", "0:5:7"])) == 3  # other experts, other weights
    with pytest.raises(CoordinateError, match="more than once"):
        parse_coords(["0:1:5:7", "0:1:5:7@0.5"])
    for bad in ("0:x:5:7", "0:1:2:3:4", "0:-1:5:7"):
        with pytest.raises(CoordinateError, match="LAYER:EXPERT:ROW:COL"):
            parse_coord(bad)


def test_expert_rows_parse_and_sort():
    assert parse_row("0:5") == (0, 5) and parse_row("0:2:5") == (0, 5, 2)
    assert parse_row("0:shared:5") == (0, 5, "shared")
    assert row_text((0, 5, 2)) == "0:2:5" and row_text((0, 5)) == "0:5"
    coords = parse_coords(["1:shared:5:7", "1:3:5:7", "1:5:7", "0:3:9:1", "1:3:5:8"])
    assert rows_of(coords) == [(0, 9, 3), (1, 5), (1, 5, 3), (1, 5, "shared")]
    with pytest.raises(UsageError, match="LAYER:EXPERT:ROW"):
        parse_row("0:a:5")


def test_expert_coordinates_are_checked_against_the_model():
    moe_model, dense_model = tiny_model("qwen2_moe"), tiny_model("llama")
    with pytest.raises(CoordinateError, match="mixture of experts.*LAYER:EXPERT:ROW:COL.*experts 0-3 or shared"):
        Ablation(moe_model, [parse_coord("0:5:7")])
    with pytest.raises(CoordinateError, match="expert 4 out of range.*experts 0-3"):
        Ablation(moe_model, [parse_coord("0:4:5:7")])
    with pytest.raises(CoordinateError, match="column 64 out of range for layer 0 expert 1"):
        Ablation(moe_model, [parse_coord("0:1:5:64")])
    with pytest.raises(CoordinateError, match="column 48 out of range for layer 0 shared expert"):
        Ablation(moe_model, [parse_coord("0:shared:5:48")])
    with pytest.raises(CoordinateError, match="no experts"):
        Ablation(dense_model, [parse_coord("0:1:5:7")])
    with pytest.raises(CoordinateError, match="layer 0 has no shared expert: it has experts 0-3$"):  # OLMoE
        Ablation(tiny_model("olmoe"), [parse_coord("0:shared:5:7")])


# ------------------------------------------------------------------------------------------- interventions
@pytest.mark.parametrize("family,expert", PLANTS)
def test_ablation_edits_one_expert_and_comes_off_exactly(family, expert):
    model = tiny_model(family)
    before = snapshot(model)
    c = WeightCoord(layer=1, row=5, col=7, expert=expert)
    dp = arch.down_projection(model, 1, expert)
    with Ablation(model, [c]):
        assert dp.get(5, 7).item() == 0.0
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        where = "shared_expert.down_proj.weight" if expert == "shared" else "experts.down_proj"
        assert changed == [f"model.layers.1.mlp.{where}"]
    assert_identical(model, before)


@pytest.mark.parametrize("family,expert", PLANTS)
def test_row_patch_on_an_expert_equals_editing_its_weight_row(family, expert):
    model = tiny_model(family)
    before, base_hooks = snapshot(model), hook_count(model)
    dp = arch.down_projection(model, 1, expert)
    d = torch.randn(dp.d_ff, generator=torch.Generator().manual_seed(1))
    with RowPatch(model, [(1, 5, expert)], [d]):
        patched = model(input_ids=IDS).logits
    assert hook_count(model) == base_hooks
    with torch.no_grad():
        dp.set_row(5, dp.row(5) + d)
    edited = model(input_ids=IDS).logits
    torch.testing.assert_close(patched, edited, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(edited, tiny_model(family)(input_ids=IDS).logits, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_prune_masks_the_router_and_comes_off(family):
    model = tiny_model(family)
    base = model(input_ids=IDS).logits
    picks = []
    experts = model.model.layers[1].mlp.experts
    with Trace({"x": experts}, lambda _n, args, _out: picks.append(args[1].clone())):
        model(input_ids=IDS)
        assert (picks[-1] == 2).any()  # expert 2 does work here
        with ExpertPrune(model, [(1, 2)]):
            pruned = model(input_ids=IDS).logits
        assert not (picks[-1] == 2).any()  # the router never picks it
        assert picks[-1].shape == picks[0].shape  # still top-k: another expert takes its place
    assert not torch.allclose(pruned, base)
    assert hook_count(model) == 0
    torch.testing.assert_close(model(input_ids=IDS).logits, base, atol=0, rtol=0)


def test_pruning_the_shared_expert_zeroes_it():
    model = tiny_model("qwen2_moe")
    with ExpertPrune(model, [(0, "shared")]):
        pruned = model(input_ids=IDS).logits
    with torch.no_grad():
        model.model.layers[0].mlp.shared_expert.down_proj.weight.zero_()
    torch.testing.assert_close(pruned, model(input_ids=IDS).logits, atol=1e-6, rtol=1e-5)
    with pytest.raises(CoordinateError, match="no experts to prune|has no experts"):
        ExpertPrune(tiny_model("llama"), [(0, 1)])


def test_a_router_superweight_cannot_reproduce_is_refused():
    model = tiny_model("mixtral")
    router = model.model.layers[0].mlp.gate

    def sigmoid_routing(hidden):  # DeepSeek-V3's kind of router: sigmoid scores, not renormalised softmax
        logits = torch.nn.functional.linear(hidden, router.weight)
        weights, index = logits.sigmoid().topk(router.top_k, dim=-1)
        return logits, weights, index

    router.forward = sigmoid_routing
    with pytest.raises(UnsupportedArchitectureError, match="does not reproduce"):
        moe.check_router(router)


# ------------------------------------------------------------------------------- planted super experts, end to end
@pytest.fixture(scope="module", params=PLANTS, ids=lambda p: f"{p[0]}-{p[1]}")
def found(request, tok, calib):
    family, expert = request.param
    model = planted_expert(family, expert=expert)
    before = snapshot(model)
    result = detect.run_detect(_loaded(model, tok), detect.DetectConfig(max_length=128), ids=calib)
    return family, expert, model, before, result


def test_planted_super_expert_is_found_confirmed_and_pruning_it_collapses(found):
    family, expert, model, before, result = found
    top = result.candidates[0]
    assert top.coord == WeightCoord(layer=0, row=5, col=7, expert=expert) and top.value == 40.0
    assert top.source.startswith("spike") and top.confirmed
    assert top.grade == "super weight" or family in WEAKER and top.grade == "sensitive weight"
    # The whole expert: pruned, it does the damage, far above two other experts pruned the same way.
    controls = max(top.expert_control_kl_top, top.expert_control_kl_random)
    if family in WEAKER:
        assert top.expert_kl > max(1.5 * controls, 0.4) and top.expert_picked >= 0.99
    else:
        assert top.expert_confirmed and top.expert_grade == "super expert" and top.expert_kl >= 10 * controls
        assert top.expert_picked == 1.0
    assert len(top.expert_controls) == 2 and str(expert) not in top.expert_controls
    # The router sends it every token that carries the massive activation (the marked token), and not every token.
    assert top.massive_tokens > 0
    assert top.expert_picked_all < 1.0 or expert == "shared"
    assert result.protocol.interventions["each candidate's expert"].startswith("pruned whole")
    assert_identical(model, before)
    assert hook_count(model) == 0


def test_detect_terminal_names_the_expert_and_its_router_picks(found):
    _family, expert, _model, _before, result = found
    console = Console(record=True, width=200)
    from superweight.report.terminal import print_detect

    print_detect(console, result)
    text = console.export_text()
    assert "L:E:R:C" in text and f"0:{expert}:5:7" in text
    if expert == "shared":
        assert "The shared expert of layer 0 (holds 0:shared:5:7): it runs on every token" in text
    else:
        assert f"Expert {expert} of layer 0 (holds 0:{expert}:5:7): the router picks it at 100% of the" in text
    assert "a super expert" in text or _family in WEAKER


def test_detect_summary_records_the_expert_and_older_records_still_load(found):
    _family, expert, _model, _before, result = found
    written = DetectSummary(weight="0:5:7", candidates=result.candidates).model_dump_json()
    summary = DetectSummary.model_validate_json(written).candidates[0]  # as results.json holds it, read back
    top = result.candidates[0]
    assert (summary.expert, summary.expert_picked, summary.expert_kl) == (expert, top.expert_picked, top.expert_kl)
    assert summary.expert_grade == top.expert_grade
    old = {"layer": 1, "row": 5, "col": 7, "value": 40.0, "confirmed": True, "source": "spike (round 1)"}
    assert Candidate(**old).expert is None  # a record from before MoE support
    assert RowGeometry(layer=1, row=5, norm=1.0, cos_original_row=0.5).key == "1:5"


@pytest.mark.parametrize("family,expert", PLANTS, ids=lambda p: str(p))
def test_default_recipe_repairs_a_pruned_super_expert_weight(family, expert, tok):
    """The default recipe (lbfgs, column coordinates from the expert's own column norms) recovers >= 95%."""
    model = planted_expert(family, expert=expert)
    coord = WeightCoord(layer=0, row=5, col=7, expert=expert)
    rows = rows_of([coord])
    cfg = RECIPES["lbfgs"]
    # Column coordinates: the expert's own column norms (not the fused tensor's, nor another expert's).
    own = arch.down_projection(model, 0, expert).matrix.norm(dim=0)
    torch.testing.assert_close(space_units(model, rows, cfg.space)[0], own)
    seqs, mask = training_sequences(tok, "pydoc", cfg)
    patch, _ = train(model, [coord], rows, (seqs, mask), cfg)
    ids = corpora.tokenize(tok, corpora.load_text("pydoc", "eval"), 1024)
    ablation = Ablation(model, [coord])
    m = measure(model, ids, {"broken": ablation, "patched": Compose(ablation, patch)}, max_length=256)
    rec = recovery(m["base"], m["broken"], m["patched"])
    assert m["broken"].kl > (0.4 if family in WEAKER else 0.5)
    assert rec.kl >= 0.95 and rec.nll_gap >= 0.95, rec


def test_balanced_space_is_refused_for_an_expert_row():
    with pytest.raises(UsageError, match="balanced.*expert"):
        space_units(tiny_model("olmoe"), [(0, 5, 1)], "balanced")


# -------------------------------------------------------------------------------------- patch files and PEFT
def _patch(model, rows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return RowPatch(model, rows, [torch.randn(arch.down_projection(model, layer, expert).d_ff, generator=gen)
                                  for layer, _row, expert in map(split_row, rows)])


def test_expert_patch_file_round_trips_applies_and_merges(tmp_path):
    model = tiny_model("qwen2_moe", mlp_only_layers=[0])  # layer 0 dense, layer 1 experts
    coords = parse_coords(["1:2:5:7", "1:shared:9:3@0.5", "0:5:1"])
    rows = rows_of(coords) + [(1, 5, 3)]  # expert 3's row is patched only
    patch = _patch(model, rows)
    with Compose(Ablation(model, coords), patch):
        want = model(input_ids=IDS).logits
    save_patch(tmp_path, model, patch, coords, {"model": "tiny"})
    config = json.loads((tmp_path / "patch_config.json").read_text())
    assert config["rows"] == [[0, 5], [1, 5, 2], [1, 9, "shared"], [1, 5, 3]]
    assert config["d_ff"] == {"0": tiny.D_FF, "1:2": tiny.D_FF, "1:3": tiny.D_FF, "1:shared": tiny.SHARED_FF}
    data = load_patch(tmp_path)
    assert data.rows == [(0, 5), (1, 5, 2), (1, 9, "shared"), (1, 5, 3)] and data.ablated == coords
    before = snapshot(model)
    live = apply_patch(model, data)
    torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=1e-6, rtol=1e-5)
    live.remove()
    assert_identical(model, before)
    merge_into_weights(model, data)
    torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-4)


def test_peft_adapter_targets_the_fused_experts_and_gives_the_patched_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model("qwen2_moe")
    coords = parse_coords(["1:2:5:7", "1:shared:9:3@0.5", "0:1:5:1"])
    rows = rows_of(coords) + [(1, 8, 2)]  # two rows of expert 2: rank 2 there, rank 1 elsewhere
    patch = _patch(model, rows)
    with Compose(Ablation(model, coords), patch):
        want = model(input_ids=IDS).logits
    save_patch(tmp_path / "run", model, patch, coords, {"model": "tiny"})
    tensors, config = adapter_tensors(model, load_patch(tmp_path / "run"))
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.down_proj" for i in (0, 1)]
    assert config["target_modules"] == ["model.layers.1.mlp.shared_expert.down_proj"] and config["r"] == 2
    a = tensors["base_model.model.model.layers.1.mlp.experts.lora_A.weight"]
    assert a.shape == (tiny.N_EXPERTS * 2, tiny.D_FF)
    from superweight.io.peft import save_adapter

    save_adapter(tmp_path / "adapter", tensors, config)
    wrapped = peft.PeftModel.from_pretrained(tiny_model("qwen2_moe"), str(tmp_path / "adapter"))
    torch.testing.assert_close(wrapped(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from superweight.io.models import save_model_dir

    path = tmp_path_factory.mktemp("moe") / "model"
    save_model_dir(planted_expert("olmoe"), tiny_tokenizer(), path)
    return path


def test_cli_detect_eval_repair_apply_on_an_moe_model(moe_dir, tmp_path):
    from conftest import invoke_cli

    out = invoke_cli("detect", "--model", moe_dir, "--calib-tokens", "512").output
    assert "0:2:5:7" in out and "a super expert" in out and "router picks it at 100%" in out
    out = invoke_cli("eval", "--model", moe_dir, "--ablate", "0:2:5:7", "--max-tokens", "256").output
    assert "ablate 0:2:5:7" in out
    run = tmp_path / "rep"
    out = invoke_cli("repair", "--model", moe_dir, "--weight", "0:2:5:7", "--eval-tokens", "256", "--out", run).output
    assert "Patch row 0:2:5" in out and "Verdict: repaired" in out
    assert load_patch(run).rows == [(0, 5, 2)]
    out = invoke_cli("apply", "--patch", run, "--export", tmp_path / "exp", "--peft", tmp_path / "peft").output
    assert "rows 0:2:5 patched" in out and "model.layers.0.mlp.experts.down_proj" in out


def test_api_repair_of_an_expert_weight_patches_the_experts_row(moe_dir, tmp_path):
    # sw.repair and `superweight repair --weight` pick the default rows with one function (coords.patch_rows).
    import superweight as sw
    from superweight.core.coords import patch_rows

    coords = parse_coords(["0:2:5:7", "1:3:4"])
    assert patch_rows(coords) == [(0, 5, 2), (1, 3)] == rows_of(coords)
    assert patch_rows(coords, ["0:2:5"]) == patch_rows(coords, [(0, 5, 2)]) == [(0, 5, 2)]
    m = sw.load(str(moe_dir), dtype="fp32")
    fixed = sw.repair(m, "0:2:5:7", out=tmp_path / "api", budget=4, eval_tokens=256)
    assert fixed.patch.rows == [(0, 5, 2)] and fixed.record.recovery.kl > 0.5
    before, ids = snapshot(m.model), IDS
    base = m.model(ids).logits
    with fixed.patch.apply():
        assert not torch.equal(m.model(ids).logits, base)
    assert_identical(m.model, before)


def test_cli_run_on_an_moe_model_names_the_super_expert(moe_dir, tmp_path):
    from conftest import invoke_cli

    out = invoke_cli("run", "--model", moe_dir, "--eval-tokens", "256", "--analysis-tokens", "256",
                     "--no-baselines", "--out", tmp_path / "run").output
    assert "repairing 0:2:5:7, a super weight" in out
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    n = record["detect"]["candidates"][0]["massive_tokens"]  # the record keeps the whole candidate, as detect does
    assert f"Expert 2 of layer 0: the router picks it at 100% of the {n} massive-activation tokens" in out
    assert "super expert" in out and "Verdict: repaired" in out
    assert record["detect"]["candidates"][0]["expert"] == 2 and record["patch"]["expert"] == 2
    assert "router picks it at massive tokens" in (tmp_path / "run" / "report.md").read_text()


def test_quantize_refuses_an_moe_model(tok):
    from superweight.stages.quantize import run_quantize

    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts"):
        run_quantize(_loaded(tiny_model("olmoe"), tok))


def test_disk_offloaded_experts_give_the_same_numbers(tmp_path, tok):
    """accelerate keeps the fused tensors of an offloaded layer on the meta device: views, hooks and pruning read
    the offloaded copy, and give the plain model's numbers."""
    from superweight.io.models import load, save_model_dir

    save_model_dir(planted_expert("qwen2_moe"), tok, tmp_path / "m")
    mapping = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapping |= {f"model.layers.{i}": "disk" if i in (0, 2) else "cpu" for i in range(4)}
    plain = load(str(tmp_path / "m"))
    off = load(str(tmp_path / "m"), device_map=json.dumps(mapping), offload_folder=str(tmp_path / "off"))
    assert off.device == "cpu+disk" and off.model.model.layers[0].mlp.experts.down_proj.is_meta
    ids = corpora.tokenize(tok, corpora.load_text("pydoc", "eval"), 256)
    coord, shared = parse_coord("0:2:5:7"), parse_coord("0:shared:3:4")
    kls = []
    for m in (plain.model, off.model):
        d = torch.full((tiny.D_FF,), 0.01)
        ablated = Ablation(m, [coord])
        conditions = {"broken": ablated, "pruned": ExpertPrune(m, [(0, 2)]), "shared": Ablation(m, [shared]),
                      "patched": Compose(ablated, RowPatch(m, [(0, 5, 2)], [d]))}
        kls.append({k: v.kl for k, v in measure(m, ids, conditions, max_length=128).items()})
    assert kls[0]["broken"] > 0.5
    assert kls[0] == pytest.approx(kls[1], abs=1e-6)
