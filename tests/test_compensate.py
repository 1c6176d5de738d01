"""Restoration or compensation (issue 27): columns held at 0 (`--exclude`) through training, resume, sparse
training, the patch file, a merged export and a PEFT adapter; the mask under every symmetry; lbfgs's progress
rule; the compensation frontier on planted models with and without a redundant neuron; `run`'s regime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import PLANT, SMALL_REPAIR, invoke_cli
from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord
from superweight.core.reparam import move_norm_gain, rescale_mlp, rescale_residual
from superweight.errors import UsageError
from superweight.io import checkpoint, corpora
from superweight.settings import revalidated
from superweight.stages.exclusion import parse_excludes, resolve, top_writers
from superweight.engine.config import RECIPES, FirstOrderConfig, LbfgsConfig, configure, recipe_settings
from superweight.stages.sparsify import HardConcrete, L1Prox
from superweight.engine.optimize import done, stalled
from superweight.engine.train import Track, train

pytestmark = pytest.mark.usefixtures("torch_single_thread")

COORD = WeightCoord(layer=PLANT[0], row=PLANT[1], col=PLANT[2])
ROWS = [(PLANT[0], PLANT[1])]
TWIN = 8  # the redundant neuron: fires exactly as the planted one, writes nothing into the row


def redundant(model, twin: int = TWIN):
    """A planted model whose neuron `twin` is a copy of the planted neuron (gate and up rows) that writes nothing
    into the planted row: the patch can route the deleted write through it."""
    mlp = model.model.layers[PLANT[0]].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[twin] = mlp.gate_proj.weight[PLANT[2]]
        mlp.up_proj.weight[twin] = mlp.up_proj.weight[PLANT[2]]
        mlp.down_proj.weight[PLANT[1], twin] = 0.0
    return model


@pytest.fixture(scope="module")
def seqs():
    ids = corpora.tokenize(tiny.tiny_tokenizer(), corpora.load_text("pydoc", "train"), 1024)
    return corpora.pack(ids, 64)


def test_exclude_specs_are_checked_and_resolved():
    assert parse_excludes(["Deleted", "top:04", "9, 3,3"]) == ["deleted", "top:4", "3,9"]
    for bad in ("top:0", "top:x", "a,b", "-1"):
        with pytest.raises(UsageError):
            parse_excludes([bad])
    coords = [COORD, WeightCoord(layer=1, row=9, col=3)]
    ranking = [[7, 12, 30], [3, 4]]
    rows = [(1, 5), (1, 9)]
    assert resolve(["deleted", "top:2"], coords, rows, [64, 64], ranking) == [[7, 12], [3, 4]]
    assert resolve(["40"], coords, rows, [64, 64]) == [[40], [40]]
    with pytest.raises(UsageError, match="past"):
        resolve(["64"], coords, rows, [64, 64])
    x = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 5.0]])
    assert top_writers(x, torch.tensor([3.0, 1.0, 0.0])) == [0, 1]  # a neuron that writes nothing is not ranked
    assert top_writers(x, torch.tensor([3.0, 1.0, 1.0]), skip=[0]) == [2, 1]


def test_lbfgs_stops_on_progress_not_on_a_count():
    assert not stalled([5.0, 4.0], 0.02, window=2)  # too few to judge
    falling = [1.0 * 0.7 ** i for i in range(30)]
    assert not stalled(falling[:9], 0.02, window=8)  # 8 evaluations closed 94% more of the first loss
    assert stalled(falling, 0.02, window=8)  # near 0: the last 8 closed < 2% of it (a done repair stops)
    floor = [1.0, 0.3] + [0.2 - 0.001 * i for i in range(10)]
    assert stalled(floor, 0.02, window=8) and not stalled(floor, 0.0, window=8)  # creeping toward a floor


def test_lbfgs_stops_once_the_damage_is_all_but_gone(tmp_path, seqs):
    assert not done([1.0], 0.01) and not done([1.0, 0.5], 0.01) and done([1.0, 0.5, 0.009], 0.01)
    assert not done([1.0, 0.0], 0.0)  # 0: never
    model = tiny.planted(PLANT)

    def losses(tol: float) -> list[float]:  # the deleted column held at 0: a repair that creeps, not one that snaps
        cfg = LbfgsConfig(max_evals=24, batch_size=2, seq_len=64, train_tokens=1024, check_sequences=0,
                          progress_tol=0.0, done_tol=tol)
        train(model, [COORD], ROWS, seqs, cfg, Track(tmp_path / str(tol)), exclude=[[PLANT[2]]])
        return [json.loads(line)["loss"] for line in (tmp_path / str(tol) / "train_log.jsonl").open()]

    whole = losses(0.0)
    tol = min(whole[: len(whole) // 2]) / whole[0] * 1.0001  # reached half-way
    part = losses(tol)
    assert 1 < len(part) < len(whole) and part == whole[: len(part)]  # the same path, cut where it was done
    assert min(part) <= tol * part[0] < min(part[:-1])


def test_the_lbfgs_budget_is_a_hard_cap_even_inside_a_line_search(tmp_path, seqs):
    """torch's L-BFGS checks max_eval only between steps, so a line search could pass it: the budget stops it
    there, and the patch is the best point evaluated."""
    model, spent = tiny.planted(PLANT), {}
    for budget in (2, 3, 5):
        cfg = LbfgsConfig(max_evals=budget, batch_size=2, seq_len=64, train_tokens=1024, check_sequences=0,
                          progress_tol=0.0, done_tol=0.0)
        out = tmp_path / str(budget)
        patch, state = train(model, [COORD], ROWS, seqs, cfg, Track(out), exclude=[[PLANT[2]]])
        losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").open()]
        assert state.steps == len(losses) <= budget
        assert state.final_loss == min(losses) < losses[0]
        assert patch.vectors[0].abs().sum() > 0
        spent[budget] = state.steps
    assert spent[3] == 3  # its first step's line search wanted a 4th evaluation


class _Killed(Exception):
    pass


def test_excluded_columns_stay_zero_through_a_killed_and_resumed_run(tmp_path, seqs, monkeypatch):
    """AdamW with weight decay from a random init: the excluded entries are exactly 0 at every checkpoint, and a run
    killed after its first checkpoint resumes to the uninterrupted run's patch, bit for bit."""
    cfg = FirstOrderConfig(steps=6, batch_size=2, seq_len=64, lr=0.05, weight_decay=0.1, init="random",
                           train_tokens=1024, check_sequences=0)
    model = tiny.planted(PLANT)
    exclude = [[3, PLANT[2], 40]]
    whole, _ = train(model, [COORD], ROWS, seqs, cfg, Track(tmp_path / "whole", checkpoint_every=3), exclude=exclude)
    d = whole.vectors[0].detach()
    assert d.abs().sum() > 0 and (d[exclude[0]] == 0).all()
    saved = checkpoint.load(tmp_path / "whole")
    assert saved["exclude"] == exclude and (saved["vectors"][0][exclude[0]] == 0).all()

    real_save = checkpoint.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(_Killed):
        train(model, [COORD], ROWS, seqs, cfg, Track(tmp_path / "killed", checkpoint_every=3), exclude=exclude)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert checkpoint.load(tmp_path / "killed")["step"] == 3
    with pytest.raises(UsageError, match="excluded"):
        train(model, [COORD], ROWS, seqs, cfg, Track(tmp_path / "killed", resume=True), exclude=[[3]])
    resumed, state = train(model, [COORD], ROWS, seqs, cfg, Track(tmp_path / "killed", resume=True), exclude=exclude)
    assert state.resumed_from == 3
    assert torch.equal(resumed.vectors[0].detach(), d)


@pytest.mark.parametrize("objective", [L1Prox(0.2), HardConcrete(1.0)])
def test_sparse_training_keeps_excluded_columns_at_zero(seqs, objective):
    cfg = FirstOrderConfig(steps=3, batch_size=2, seq_len=64, lr=0.3, optimizer="adam", space="column", train_tokens=1024)
    model = tiny.planted(PLANT)
    start = torch.randn(down_projection(model, PLANT[0]).d_ff, generator=torch.Generator().manual_seed(0))
    start[[PLANT[2], 9]] = 0.0
    kind = type(objective)(objective.strength, [start])
    p, _ = train(model, [COORD], ROWS, seqs, cfg, None, kind, [[PLANT[2], 9]])
    final = kind.final(p)[0]
    assert (final[[PLANT[2], 9]] == 0).all() and final.abs().sum() > 0


def test_an_exclusion_gives_the_same_repair_under_every_symmetry(seqs):
    """A mask is coordinate-wise: with the deleted column held at 0, the default repair (through the redundant
    neuron) writes the same after the neuron, residual-stream and norm-gain rescalings together."""
    from superweight.measure.inputs import down_inputs
    from test_reparam import eps_free, factors

    cfg = configure(RECIPES["lbfgs"], seq_len=64, budget=12)
    model = eps_free(redundant(tiny.planted(PLANT)))
    d_ff = down_projection(model, PLANT[0]).d_ff
    probe = seqs[:1].flatten()
    exclude = [[PLANT[2]]]
    p1, s1 = train(model, [COORD], ROWS, seqs, cfg, exclude=exclude)
    write1 = down_inputs(model, probe, PLANT[0])[0] @ p1.vectors[0].detach()
    rescale_residual(model, 0.1)
    move_norm_gain(model, 10.0)
    rescale_mlp(model, PLANT[0], factors(d_ff, seed=5).abs())
    p2, s2 = train(model, [COORD], ROWS, seqs, cfg, exclude=exclude)
    write2 = down_inputs(model, probe, PLANT[0])[0] @ p2.vectors[0].detach()
    assert p1.vectors[0][PLANT[2]] == 0 and p2.vectors[0][PLANT[2]] == 0
    assert s1.check.best_kl < 0.5 * s1.check.broken_kl  # it repaired, through the twin
    assert s2.check.best_kl == pytest.approx(s1.check.best_kl, rel=2e-2, abs=1e-6)
    assert torch.allclose(write2, 0.1 * write1, rtol=2e-2, atol=2e-2 * 0.1 * write1.abs().max())


def _frontier(model, tmp_path: Path):
    from superweight.stages.compensate import CompensateConfig, run_compensate
    from superweight.stages.repair import RepairJob, run_repair

    loaded = tiny.handle(model)
    cfg = recipe_settings("lbfgs", seq_len=64, train_tokens=2048, budget=24)
    run_repair(loaded, [COORD], ROWS, tmp_path, RepairJob(config=cfg, eval_tokens=256))
    return run_compensate(loaded, tmp_path, CompensateConfig(max_k=2, tokens=256))


def test_the_frontier_finds_compensation_through_a_redundant_neuron(tmp_path):
    record = _frontier(redundant(tiny.planted(PLANT)), tmp_path)
    c = record.compensation
    first, second = c.points[0], c.points[1]
    assert first.label == "none" and first.value_ratio > 0.5 and first.neurons[0].neuron == PLANT[2]  # restoration
    assert second.label == "top 1" and second.excluded == [PLANT[2]]
    assert second.kl_recovery > 0.7 and second.check_recovery > 0.7  # compensation ...
    assert second.neurons[0].neuron == TWIN and second.neurons[0].share > 0.9  # ... through the twin
    assert second.participation == pytest.approx(1.0, abs=0.1)
    assert c.points[-1].excluded == [PLANT[2], TWIN] and c.points[-1].kl_recovery < 0.1  # both paths gone
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [p["label"] for p in saved["compensation"]["points"]] == [p.label for p in c.points]
    import superweight.api  # noqa: F401 (registers the notebook renderers, as the first sw.<name> does)

    assert "Compensation(" in repr(c) and "Compensation frontier" in c._repr_html_()  # sw.compensate's result
    from superweight.report import write_report

    _md, page = write_report(tmp_path, record)
    html = page.read_text()
    assert "Compensation frontier" in html and "Regime: restoration" in html


def test_without_a_redundant_neuron_nothing_compensates(tmp_path):
    c = _frontier(tiny.planted(PLANT), tmp_path).compensation
    assert c.points[0].kl_recovery > 0.9
    assert len(c.points) == 2 and c.points[1].kl_recovery < 0.1  # the frontier stops at the first exclusion
    assert "below" in c.stopped or "< 10%" in c.stopped


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory) -> Path:
    from superweight.io.models import save_model_dir

    path = tmp_path_factory.mktemp("twin") / "model"
    save_model_dir(redundant(tiny.planted(PLANT)), tiny.tiny_tokenizer(), path)
    return path


@pytest.fixture(scope="module")
def excluded_run(twin_dir, tmp_path_factory):
    """`repair --exclude top:1 --exclude 3` on the planted model with a twin: top:1 is the planted neuron (the
    unconstrained repair restores), and the patch compensates through the twin."""
    out = tmp_path_factory.mktemp("excl") / "run"
    result = invoke_cli("repair", "--model", twin_dir, "--weight", "1:5:7", "--exclude", "top:1",
                        "--exclude", "3", *SMALL_REPAIR, "--dtype", "fp32", "--out", out)
    return out, result.output


def test_excluded_columns_are_zero_in_the_patch_the_export_and_the_adapter(excluded_run, twin_dir, tmp_path):
    from superweight.io.models import load

    out, output = excluded_run
    res = json.loads((out / "results.json").read_text())
    cols = res["exclusion"]["columns"]["1:5"]
    assert cols == [3, PLANT[2]] and res["exclusion"]["specs"] == ["top:1", "3"] and res["exclusion"]["ranked_by"]
    assert json.loads((out / "config.json").read_text())["exclude"] == ["top:1", "3"]
    assert json.loads((out / "patch_config.json").read_text())["excluded"] == [cols]
    d = load_file(str(out / "patch.safetensors"))["layer1.row5"]
    assert (d[cols] == 0).all() and d[TWIN] != 0  # it compensates through the twin
    assert "Regime: compensation" in output
    invoke_cli("apply", "--patch", out, "--export", tmp_path / "merged", "--peft", tmp_path / "adapter")
    intact = load(str(twin_dir)).model
    merged = load(str(tmp_path / "merged")).model
    w0, w1 = down_projection(intact, 1).row(5), down_projection(merged, 1).row(5)
    assert w1[PLANT[2]] == 0  # the deleted weight, ablated, and nothing added back
    others = [c for c in cols if c != PLANT[2]]
    assert torch.equal(w1[others], w0[others])  # the patch adds exactly 0 there
    lora = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    a = next(v for k, v in lora.items() if "lora_A" in k)[0]
    assert (a[others] == 0).all() and a[PLANT[2]] == -w0[PLANT[2]]  # only the ablation at the deleted column


def test_every_later_stage_works_on_a_compensation_run(excluded_run, tmp_path):
    out, _ = excluded_run
    invoke_cli("analyze", out, "--tokens", "256", "--draws", "1")
    invoke_cli("sparsify", out, "--l1", "0.5", "--l0", "", "--steps", "2", "--tokens", "256")
    res = json.loads((out / "results.json").read_text())
    cols = res["exclusion"]["columns"]["1:5"]
    for p in res["sparse_training"]["points"]:
        assert not {i for i, v in p["top_entries"] if v != 0} & set(cols)
    text = invoke_cli("compensate", out, "--max-k", "1", "--tokens", "256").output
    assert "Compensation frontier" in text and "Stopped" in text
    assert "Compensation frontier" in (out / "report.html").read_text()
    invoke_cli("report", out)
    invoke_cli("compare", out, out)


def test_run_names_the_regime(pipeline_run):
    out, result = pipeline_run
    res = json.loads((out / "results.json").read_text())
    regime = res["regime"]
    assert regime["regime"] == "restoration" and regime["value_ratio"] > 0.5
    assert regime["without_deleted"]["excluded"] == [PLANT[2]]
    assert "repair (deleted excluded)" in res["timings"]
    # The second repair is scored alone: the broken model is the record's and the base pass the repair's (kept in
    # measure/metrics.Passes), over the same tokens; the analyses read that base pass too.
    parts = res["cost"]["stages"]["repair (deleted excluded)"]["parts"]
    assert "without_deleted" in parts and "base" not in parts and not any(k.endswith("broken") for k in parts)
    analyzed = res["cost"]["stages"]["analyze"]["parts"]  # base, broken and patched: the repair's passes, read
    assert not {"conditions/base", "conditions/broken", "conditions/patched"} & analyzed.keys()
    assert "conditions/top1" in analyzed
    point, base, broken = regime["without_deleted"], res["base"]["nll"], res["broken"]["nll"]
    assert point["nll_gap"] == pytest.approx((broken - point["nll"]) / (broken - base), rel=1e-6)
    assert "Regime: restoration" in result.output and "Without the deleted weight" in result.output
    assert "Regime: restoration" in (out / "report.html").read_text()
