"""End to end on the embedded SmolLM2-135M-Instruct (conftest's `smol`: loaded once per session, ~20 s on 2 cores)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from superweight.core.arch import down_projection
from superweight.core.coords import parse_coord
from superweight.core.intervene import Ablation
from superweight.io import corpora
from superweight.io import models
from superweight.measure.metrics import measure
from superweight.stages import detect
from superweight.settings import revalidated

pytestmark = pytest.mark.slow
SUPER = parse_coord("11:507:1229")


def test_embedded_spec_resolves_to_the_packaged_gguf():
    where, gguf, kind = models.resolve_spec("smollm2-135m")
    assert (gguf, kind) == ("SmolLM2-135M-Instruct.Q4_1.gguf", "embedded")
    assert models.resolve_spec(f"{where}/{gguf}") == (where, gguf, "gguf")


def test_second_load_comes_bit_identical_from_the_cache(smol):
    assert smol.cache is None  # the session's first load went through the GGUF
    again = models.load("smollm2-135m")
    assert again.cache is not None and again.source == smol.source
    first, second = smol.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    text = "Paris is in France.\ndef f(x):  return x  # ünïcode"
    assert again.tokenizer(text)["input_ids"] == smol.tokenizer(text)["input_ids"]
    assert again.model.lm_head.weight.data_ptr() == again.model.model.embed_tokens.weight.data_ptr()  # still tied
    ids = smol.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # same config too (rope, norms, ...), not just the same tensors
        assert torch.equal(smol.model(ids).logits, again.model(ids).logits)


def test_loaded_model_shape_and_super_weight(smol):
    cfg = smol.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert smol.model.dtype == torch.float32
    assert abs(down_projection(smol.model, 11).get(507, 1229).item()) > 5  # a large weight for this matrix


def test_ablation_collapses_the_model_and_comes_off_exactly(smol):
    before = down_projection(smol.model, 11).weight.clone()
    ids = corpora.tokenize(smol.tokenizer, corpora.load_text("pydoc", "eval"), 512)
    out = measure(smol.model, ids, {"ablated": Ablation(smol.model, [SUPER])}, channels=[(11, 507)])
    base, broken = out["base"], out["ablated"]
    assert broken.ppl > 3 * base.ppl
    assert broken.kl > 0.5 and broken.top1_agree < 0.7
    assert base.super_activation > 10_000 and base.super_activation > 3 * broken.super_activation
    assert torch.equal(down_projection(smol.model, 11).weight, before)


def test_detect_ranks_the_known_super_weight_first_and_confirmed(smol):
    ids = corpora.tokenize(smol.tokenizer, corpora.load_text("pydoc", "train"), 256)  # as the quickstart's
    result = detect.run_detect(smol, detect.DetectConfig(attribution=None, max_candidates=3), ids=ids)
    top = result.candidates[0]
    assert (top.layer, top.row, top.col, top.confirmed) == (11, 507, 1229, True)
    assert result.published[0]["confirmed"] is True


def test_cli_eval_on_the_embedded_model(smol, monkeypatch, tmp_path):
    from superweight.cli import app

    monkeypatch.setattr(models, "load", lambda *a, **k: smol)  # reuse the session's copy: no second load
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", "--max-tokens", "256", "--prompt", "Paris is in France. Tokyo is in",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["protocol"]["interventions"] == {"ablated": "ablate 11:507:1229"}  # the published default
    assert doc["ablated"]["ppl"] > 2 * doc["base"]["ppl"]
    gen = doc["generations"][0]
    assert "Japan" in gen["base"] and gen["ablated"] != gen["base"]


def test_short_repair_on_the_embedded_model_recovers_and_round_trips(smol, tmp_path):
    from superweight.core.intervene import Compose
    from superweight.core.patching import apply_patch
    from superweight.io.patchfile import load_patch, save_patch
    from superweight.measure.recovery import recovery
    from superweight.engine.config import FirstOrderConfig
    from superweight.engine.train import Track, train

    cfg = FirstOrderConfig(steps=12, batch_size=2, seq_len=64, train_tokens=1024)  # 16 sequences: cached after 8 steps
    seqs = corpora.pack(corpora.tokenize(smol.tokenizer, corpora.load_text("pydoc", "train"), cfg.train_tokens), 64)
    patch, state = train(smol.model, [SUPER], [(11, 507)], seqs, cfg, Track(tmp_path, checkpoint_every=6))
    assert state.teacher_cached
    ids = corpora.tokenize(smol.tokenizer, corpora.load_text("pydoc", "eval"), 256)
    out = measure(smol.model, ids, {"broken": Ablation(smol.model, [SUPER]),
                                    "patched": Compose(Ablation(smol.model, [SUPER]), patch)})
    rec = recovery(out["base"], out["broken"], out["patched"])
    assert rec.kl > 0.4 and rec.nll_gap > 0.4  # 12 steps already close much of the gap
    save_patch(tmp_path, smol.model, patch, [SUPER], {"model": "smollm2-135m", "spec": "smollm2-135m"})
    live = apply_patch(smol.model, load_patch(tmp_path))
    try:
        again = measure(smol.model, ids)["base"]  # "base" here = the model with the loaded patch applied
    finally:
        live.remove()
    assert abs(again.nll - out["patched"].nll) < 1e-4


def test_cli_run_on_the_embedded_model_writes_the_report(smol, monkeypatch, tmp_path):
    """The one-shot pipeline at toy sizes: every stage runs on the real model and the report shows it."""
    from superweight.cli import app

    monkeypatch.setattr(models, "load", lambda *a, **k: smol)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--weight", "11:507:1229", "--steps", "4", "--no-baselines",
                                      "--eval-tokens", "256", "--analysis-tokens", "256", "--draws", "1",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    assert res["detect"]["weight"] == "11:507:1229"
    assert res["recovery"]["nll_gap"] > 0.05  # 4 steps at lr 0.2 already help
    ks = [p["k"] for p in res["sparsity"]]  # the search's k: 1 first, the full patch last, powers of two between
    assert ks[0] == 1 and ks[-1] == 1536 and all(k & (k - 1) == 0 for k in ks[:-1]) and ks == sorted(ks)
    assert res["patch"]["col"] == 1229 and res["patch"]["deleted_value"] == pytest.approx(5.8757, abs=1e-3)
    assert res["super_activation"]["base"] > 10_000 > res["super_activation"]["broken"]
    assert res["tokens"]["logit_lens"]["row"] == 507 and len(res["neurons"]) == 5
    html = (out / "report.html").read_text()
    for section in ("Sparsity", "Tokens", "Generations", "Protocol"):
        assert section in html


def test_detection_and_repair_are_the_same_on_a_rescaled_embedded_model(smol):
    """Layer 11's MLP rescaled per neuron without changing the function: detection finds 11:507:1229 first,
    graded a super weight, with the same KL; the default recipe's patch writes the same (issue 9)."""

    import tiny
    from superweight.core.reparam import rescale_mlp
    from superweight.engine.config import RECIPES
    from superweight.engine.train import train, training_sequences

    model, tok = smol.model, smol.tokenizer
    loaded = tiny.handle(model, tok, spec="smollm2-135m", source="embedded")
    cfg = detect.DetectConfig(calib_tokens=128, attribution=None)
    repair = revalidated(RECIPES["balanced"], steps=4, seq_len=64, train_tokens=512, check_sequences=0)
    seqs, mask = training_sequences(tok, "pydoc", repair)
    a = torch.exp(1.5 * torch.randn(down_projection(model, 11).d_ff, generator=torch.Generator().manual_seed(0)))

    def study():
        top = detect.run_detect(loaded, cfg).candidates[0]
        patch, _ = train(model, [SUPER], [(11, 507)], (seqs, mask), repair)
        return top, patch.vectors[0].detach().clone()

    mlp = down_projection(model, 11).block.mlp
    intact = {k: v.clone() for k, v in mlp.state_dict().items()}
    first, d1 = study()
    try:
        rescale_mlp(model, 11, a)
        second, d2 = study()
    finally:
        mlp.load_state_dict(intact)
    assert (first.layer, first.row, first.col) == (second.layer, second.row, second.col) == (11, 507, 1229)
    assert first.grade == second.grade == "super weight"
    assert second.kl == pytest.approx(first.kl, rel=1e-3)
    assert second.value == pytest.approx(first.value / a[1229].item(), rel=1e-5)  # the weight itself moved
    assert torch.allclose(d2 * a, d1, rtol=1e-3, atol=1e-3 * d1.abs().max().item())  # the same write
