"""`--dtype auto` and `--device-map`: the dtype choice, option checks, and a model with layers offloaded to disk
(accelerate's big-model dispatch) that gives the same metrics, the same patch and the same export as the plain
model, and is restored exactly after every intervention."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PLANT, invoke_cli

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, Compose
from superweight.core.patching import merge_into_weights
from superweight.errors import UsageError
from superweight.io import placement
from superweight.io.models import load, save_model_dir
from superweight.io.patchfile import load_patch
from superweight.measure.metrics import Scoring, measure
from superweight.engine.config import FirstOrderConfig
from superweight.engine.train import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")
COORD = WeightCoord(layer=PLANT[0], row=PLANT[1], col=PLANT[2])
DISK_LAYERS = (1, 3)  # the super weight's own layer among them


def disk_map(n_layers: int = 6) -> dict:
    mapping = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    mapping.update({f"model.layers.{i}": "disk" if i in DISK_LAYERS else "cpu" for i in range(n_layers)})
    return mapping


@pytest.fixture()
def models(planted_dir, tmp_path):
    plain = load(str(planted_dir))
    offloaded = load(str(planted_dir), device_map=json.dumps(disk_map()), offload_folder=str(tmp_path / "off"))
    return plain, offloaded


# ------------------------------------------------------------------------------------------------ dtype auto
@pytest.mark.parametrize("cpuinfo, dtype, why", [
    ("flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n", "bf16", "avx512_bf16"),
    ("flags\t\t: fpu avx2 amx_bf16 amx_tile\n", "bf16", "amx_bf16"),
    ("Features\t: fp asimd sve bf16 i8mm\n", "bf16", "bf16"),
    ("flags\t\t: fpu sse avx2 fma\n", "fp32", "without native bf16"),
    ("", "fp32", "without native bf16"),
])
def test_auto_dtype_follows_the_cpu_flags(monkeypatch, cpuinfo, dtype, why):
    monkeypatch.delenv(placement.AUTO_ENV, raising=False)
    got, reason = placement.choose_dtype("cpu", cpuinfo)
    assert got == dtype and why in reason


def test_auto_dtype_refuses_bf16_where_it_drifts(monkeypatch):
    monkeypatch.delenv(placement.AUTO_ENV, raising=False)
    monkeypatch.setattr(placement, "CPU_BF16_FAITHFUL", False)
    got, reason = placement.choose_dtype("cpu", "flags : avx512_bf16\n")
    assert got == "fp32" and "more than 2 points" in reason


def test_auto_dtype_pinned_and_recorded(monkeypatch, planted_dir, tmp_path):
    monkeypatch.setenv(placement.AUTO_ENV, "bf16")
    loaded = load(str(planted_dir), dtype="auto")
    assert loaded.dtype == "bf16" and next(loaded.model.parameters()).dtype == torch.bfloat16
    assert "pinned" in loaded.dtype_reason
    monkeypatch.delenv(placement.AUTO_ENV)
    result = invoke_cli("eval", "--model", planted_dir, "--max-tokens", "128", "--max-length", "64",
                        "--json", tmp_path / "e.json")
    protocol = json.loads((tmp_path / "e.json").read_text())["protocol"]
    choice = placement.choose_dtype("cpu")
    assert (protocol["dtype"], protocol["dtype_reason"]) == choice
    assert f"dtype auto: {choice[0]} ({choice[1]})" in result.output  # said once, on stderr
    monkeypatch.setenv(placement.AUTO_ENV, "int4")
    with pytest.raises(UsageError, match="int4"):
        placement.choose_dtype("cpu")


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("args, message", [
    ((None, "0=1GiB", None), "need --device-map"),
    (("{not json", None, None), "invalid --device-map"),
    (("[1, 2]", None, None), "non-empty object"),
    (('{"": "disk"}', None, None), "--offload-folder"),
    (("auto", "gpu0=1GiB", None), "invalid --max-memory device"),
    (("auto", "nonsense", None), "invalid --max-memory"),
])
def test_bad_placement_options_are_usage_errors(args, message):
    with pytest.raises(UsageError, match=message):
        placement.device_map_kwargs(*args)


def test_placement_options_parse():
    kwargs = placement.device_map_kwargs("balanced", "0=20GiB,1=20GiB,cpu=60GiB")
    assert kwargs == {"device_map": "balanced", "max_memory": {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}}
    assert placement.parse_max_memory('{"0": "1GiB", "cpu": "2GiB"}') == {0: "1GiB", "cpu": "2GiB"}


def test_cli_bad_device_map_is_one_line(planted_dir):
    from typer.testing import CliRunner

    from superweight.cli import app

    result = CliRunner().invoke(app, ["eval", "--model", str(planted_dir), "--device-map", '{"": "disk"}'])
    assert result.exit_code == 2 and "Error: --device-map puts modules on the disk" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------ offload
def test_offloaded_layers_live_on_disk(models):
    _, off = models
    assert off.device == "cpu+disk" and off.device_map is not None
    dp = down_projection(off.model, COORD.layer)
    assert dp.module.weight.is_meta  # nothing of it in the module between passes
    assert dp.get(COORD.row, COORD.col).item() == pytest.approx(40.0)


def test_offloaded_model_gives_the_same_metrics_and_patch(models):
    plain, off = models
    seqs = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = FirstOrderConfig(steps=3, batch_size=2, seq_len=16, lr=0.1, train_tokens=128)
    patches = [train(m.model, [COORD], [(COORD.layer, COORD.row)], seqs, cfg)[0] for m in models]
    assert torch.equal(patches[0].vectors[0], patches[1].vectors[0])
    assert patches[0].vectors[0].norm() > 0
    ev = torch.randint(0, 100, (200,), generator=torch.Generator().manual_seed(1))
    results = []
    for m, patch in zip(models, patches):
        conditions = {"broken": Ablation(m.model, [COORD]), "patched": Compose(Ablation(m.model, [COORD]), patch)}
        results.append(measure(m.model, ev, conditions, [(COORD.layer, COORD.row)], 64,
                               scoring=Scoring(share_below=COORD.layer)))
    for name in ("base", "broken", "patched"):
        assert results[0][name].model_dump() == results[1][name].model_dump(), name
    assert results[1]["broken"].kl > 0.1  # the ablation really reached the disk-offloaded layer


def test_offloaded_weights_are_restored_exactly(models):
    _, off = models
    dp = down_projection(off.model, COORD.layer)
    before = dp.weight.clone()
    ids = torch.randint(0, 100, (1, 12))
    logits = off.model(ids).logits
    with Ablation(off.model, [COORD]):
        assert dp.get(COORD.row, COORD.col).item() == 0.0
        assert not torch.equal(off.model(ids).logits, logits)
    assert torch.equal(dp.weight, before) and torch.equal(off.model(ids).logits, logits)


def test_export_from_an_offloaded_model_matches_the_plain_one(models, repair_runs, tmp_path):
    plain, off = models
    patch = load_patch(repair_runs["minimal"][0])
    for name, loaded in (("plain", plain), ("off", off)):
        merge_into_weights(loaded.model, patch)
        save_model_dir(loaded.model, loaded.tokenizer, tmp_path / name)
    a, b = load(str(tmp_path / "plain")).model.state_dict(), load(str(tmp_path / "off")).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    row = down_projection(load(str(tmp_path / "off")).model, COORD.layer).matrix[COORD.row]
    assert row[COORD.col].item() != 40.0  # ablated, then patched: the merge reached the exported file


def test_cli_repair_with_disk_offload_matches_plain(planted_dir, tmp_path):
    args = ["repair", "--model", planted_dir, "--weight", "1:5:7", "--steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--eval-tokens", "128"]
    invoke_cli(*args, "--out", tmp_path / "plain")
    result = invoke_cli(*args, "--out", tmp_path / "off", "--device-map", json.dumps(disk_map()),
                        "--offload-folder", tmp_path / "offload")
    assert "device map" in result.output and "cpu+disk" in result.output
    a, b = load_patch(tmp_path / "plain"), load_patch(tmp_path / "off")
    assert all(torch.equal(x, y) for x, y in zip(a.vectors, b.vectors))
    ra = json.loads((tmp_path / "plain" / "results.json").read_text())
    rb = json.loads((tmp_path / "off" / "results.json").read_text())
    assert ra["patched"] == rb["patched"] and rb["protocol"]["device"] == "cpu+disk"
