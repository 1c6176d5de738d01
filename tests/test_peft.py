"""Patches as PEFT LoRA adapters (io/peft.py, `apply --peft`): loaded by PEFT on the intact model they give
superweight's own patched (or ablated) logits, and merged they equal `apply --export`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from superweight.cli import app
from superweight.core.coords import parse_coord
from superweight.core.intervene import Ablation, Compose, RowPatch
from superweight.core.patching import apply_patch
from superweight.io.patchfile import load_patch, save_patch
from superweight.io.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_tensors, save_adapter
from tiny import assert_identical, hook_count, snapshot, tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("torch_single_thread")
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def peft_logits(model, adapter_dir, ids=IDS) -> torch.Tensor:
    """Logits of `model` with the adapter loaded by PEFT; the model is unwrapped again afterwards."""
    wrapped = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    try:
        return wrapped(ids).logits
    finally:
        wrapped.unload()


# Two layers; layer 1 has an ablated-and-patched row (5), an ablated-only row (9, scaled by 0.5) and a
# patched-only row (11): rank 3 there, rank 2 in layer 0. Every kind of fold in one patch.
COORDS = ["1:5:7", "1:9:3@0.5", "0:2:1"]
ROWS = [(1, 5), (1, 11), (0, 4)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "phi3"])
def test_adapter_gives_the_patched_logits_on_the_intact_model(family, tmp_path):
    model = tiny_model(family, seed=1)
    coords = [parse_coord(c) for c in COORDS]
    gen = torch.Generator().manual_seed(0)
    patch = RowPatch(model, ROWS, [torch.randn(64, generator=gen) for _ in ROWS])
    save_patch(tmp_path, model, patch, coords, {"model": family})
    before = snapshot(model)
    with Compose(Ablation(model, coords), patch):
        want = model(IDS).logits
    with Ablation(model, coords):
        broken = model(IDS).logits
    base = model(IDS).logits
    for ablation_only, target in ((False, want), (True, broken)):
        tensors, config = adapter_tensors(model, load_patch(tmp_path), ablation_only)
        out = save_adapter(tmp_path / f"adapter-{ablation_only}", tensors, config)
        got = peft_logits(model, out)
        error = (got - target).abs().max()
        assert error < 1e-4
        assert (got - base).abs().max() > 10 * error  # the adapter does something
        assert config["fan_in_fan_out"] == (family == "gpt2")
        # rows touched per layer: patched 1 -> {5, 9, 11}, 0 -> {2, 4}; ablation only 1 -> {5, 9}, 0 -> {2}
        assert config["r"] == config["lora_alpha"] == (2 if ablation_only else 3)
        assert list(config["rank_pattern"].values()) == [1 if ablation_only else 2] == list(
            config["alpha_pattern"].values())
    assert_identical(model, before)
    assert hook_count(model) == 0


def test_a_row_patch_is_rank_one_with_the_ablation_folded_in(tmp_path):
    model = tiny_model("llama", seed=2)
    coord = parse_coord("1:5:7")
    d = torch.randn(64, generator=torch.Generator().manual_seed(3))
    save_patch(tmp_path, model, RowPatch(model, [(1, 5)], [d]), [coord], {})
    tensors, config = adapter_tensors(model, load_patch(tmp_path))
    key = "base_model.model.model.layers.1.mlp.down_proj"
    a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    assert a.shape == (1, 64) and b.shape == (32, 1)
    assert torch.equal(b[:, 0], torch.nn.functional.one_hot(torch.tensor(5), 32).float())
    expected = d.clone()
    expected[7] -= model.model.layers[1].mlp.down_proj.weight[5, 7]
    assert torch.allclose(a[0], expected)
    assert config["r"] == config["lora_alpha"] == 1 and config["target_modules"] == [key.removeprefix("base_model.model.")]


def test_cli_peft_adapter_matches_apply_and_merges_to_the_export(planted_dir, repair_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = repair_runs["two_weights"][0]  # 1:5:7 and 1:9:3 ablated, rows 1:5 and 1:9 patched
    adapter, export, broken = tmp_path / "adapter", tmp_path / "export", tmp_path / "broken"
    result = invoke("apply", "--patch", run_dir, "--model", planted_dir, "--dtype", "fp32", "--peft", adapter,
                    "--export", export)
    assert result.exit_code == 0, result.output
    assert "LoRA adapter" in result.output and "rank 2" in result.output
    assert sorted(p.name for p in adapter.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]  # no full model
    assert (adapter / ADAPTER_WEIGHTS).stat().st_size < 20_000
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(planted_dir)
    loaded_config = peft.LoraConfig.from_pretrained(str(adapter))
    assert loaded_config.r == 2 and loaded_config.lora_alpha == 2
    with safe_open(str(adapter / ADAPTER_WEIGHTS), "pt") as f:
        about = json.loads(f.metadata()["superweight"])
    assert about["ablated"] == ["1:5:7", "1:9:3"] and about["fingerprint"] == load_patch(run_dir).config.fingerprint

    base = AutoModelForCausalLM.from_pretrained(planted_dir).eval()
    live = apply_patch(base, load_patch(run_dir))
    try:
        want = base(IDS).logits
    finally:
        live.remove()
    assert (peft_logits(base, adapter) - want).abs().max() < 1e-4

    merged = peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    exported = AutoModelForCausalLM.from_pretrained(export).state_dict()
    for name, value in merged.state_dict().items():
        assert torch.allclose(value, exported[name], atol=1e-5), name

    result = invoke("apply", "--patch", run_dir, "--model", planted_dir, "--dtype", "fp32", "--peft", broken,
                    "--ablation-only")
    assert result.exit_code == 0, result.output
    base = AutoModelForCausalLM.from_pretrained(planted_dir).eval()
    with Ablation(base, load_patch(run_dir).ablated):
        want = base(IDS).logits
    assert (peft_logits(base, broken) - want).abs().max() < 1e-4


@pytest.mark.parametrize("args, message", [
    ([], "give --export DIR"),
    (["--export", "X", "--ablation-only"], "--ablation-only applies to --peft"),
    (["--export", "SAME", "--peft", "SAME"], "two different directories"),
    (["--peft", "EXISTS"], "exists already"),
])
def test_apply_option_errors_are_one_line(repair_runs, tmp_path, args, message):
    (tmp_path / "EXISTS").mkdir()
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    result = invoke("apply", "--patch", repair_runs["minimal"][0], *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "X").exists() and not (tmp_path / "SAME").exists()


@pytest.mark.slow
def test_adapter_on_the_embedded_model_gives_superweights_patched_logits(tmp_path, smol):
    from superweight.io import corpora

    model = smol.model
    coord = parse_coord("11:507:1229")
    d = torch.randn(1536, generator=torch.Generator().manual_seed(0)) * 0.05
    d[1229] = 4.7  # like the SGD recipe's patch: most of the deleted 5.88 back at its own column
    patch = RowPatch(model, [(11, 507)], [d])
    save_patch(tmp_path, model, patch, [coord], {"model": "smollm2-135m", "spec": "smollm2-135m"})
    ids = corpora.tokenize(smol.tokenizer, corpora.load_text("pydoc", "eval"), 128).view(1, -1)
    layer11 = model.model.layers[11].mlp.down_proj.weight.clone()
    with torch.no_grad():
        with Compose(Ablation(model, [coord]), patch):
            want = model(ids).logits
        with Ablation(model, [coord]):
            broken = model(ids).logits
        base = model(ids).logits
        tensors, config = adapter_tensors(model, load_patch(tmp_path))
        got = peft_logits(model, save_adapter(tmp_path / "adapter", tensors, config), ids)
    assert config["target_modules"] == ["model.layers.11.mlp.down_proj"] and config["r"] == 1
    # The LoRA path subtracts x[1229] * 5.88 (~17,500) from the intact output in fp32: a few 1e-3 of rounding.
    assert (got - want).abs().max() < 2e-2 < (broken - want).abs().max()
    assert (got - base).abs().max() > 0.1
    assert torch.equal(model.model.layers[11].mlp.down_proj.weight, layer11)
    assert type(model.model.layers[11].mlp.down_proj).__name__ == "Linear" and hook_count(model) == 0
