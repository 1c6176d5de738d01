"""stages/analyze.py and stages/sparsify.py on a planted tiny llama, where the right answers are known."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from superweight.core.arch import decoder_layers, down_projection, final_norm
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, Compose, RowPatch
from superweight.errors import SuperweightError
from superweight.io import corpora
from superweight.io.patchfile import save_patch
from superweight.schema.record import SparsityPoint, smallest_k
from superweight.io.rundir import RunDir
from superweight.measure.geometry import geometry
from superweight.measure.metrics import Scoring, measure
from superweight.core.conditions import CONTRIB_K, TOP_K
from superweight.schema.record import Metrics
from superweight.measure.recovery import scored
from superweight.measure.sparsity import SparsitySearch, powers_of_two
from superweight.measure.views import logit_lens
from superweight.report import write_report
from superweight.report.terminal import print_analysis
from superweight.stages.analyze import AnalyzeConfig, run_analyze
from superweight.engine.config import FirstOrderConfig
from superweight.stages.repair import RepairJob, run_repair
from superweight.stages.sparsify import GatedRowPatch, HardConcrete, L1Prox, SparsifyConfig, pareto, run_sparsify
import tiny
from tiny import assert_identical, hook_count, planted, snapshot, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PLANT = (1, 5, 7)
COORD = WeightCoord(layer=1, row=5, col=7)


@pytest.fixture(scope="module")
def loaded():
    return tiny.handle(planted(PLANT), tiny_tokenizer())


def oracle_vector(model) -> torch.Tensor:
    d = torch.zeros(down_projection(model, 1).d_ff)
    d[7] = down_projection(model, 1).get(5, 7).item()
    return d


def make_run(tmp_path, loaded, vector) -> Path:
    """A run directory made by a short `repair` of 1:5:7 on row 1:5, then holding `vector` as its patch."""
    run = tmp_path / "run"
    cfg = FirstOrderConfig(steps=4, batch_size=2, seq_len=32, train_tokens=1024, lr=0.1)
    run_repair(loaded, [COORD], [(1, 5)], run, RepairJob(recipe="fast", config=cfg, eval_tokens=64, max_length=64))
    save_patch(run, loaded.model, RowPatch(loaded.model, [(1, 5)], [vector]), [COORD], {"spec": "tiny"})
    return run


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory, loaded):
    run = make_run(tmp_path_factory.mktemp("oracle"), loaded, oracle_vector(loaded.model))
    before = snapshot(loaded.model)
    record = run_analyze(loaded, run, AnalyzeConfig(tokens=256, draws=2, max_length=64, top_neurons=3))
    assert_identical(loaded.model, before)
    assert hook_count(loaded.model) == 0
    return run, record.model_dump(mode="json")  # the record as results.json holds it


def test_oracle_patch_geometry_is_the_deleted_weight(oracle_run, loaded):
    _, results = oracle_run
    g = results["patch"]
    w = down_projection(loaded.model, 1).get(5, 7).item()
    assert (g["layer"], g["row"], g["col"]) == (1, 5, 7)
    assert g["cos_ablated_direction"] == pytest.approx(1.0)
    assert g["value_at_col"] == pytest.approx(w) and g["deleted_value"] == pytest.approx(w)
    assert g["norm"] == pytest.approx(abs(w))
    row = down_projection(loaded.model, 1).row(5)
    assert g["cos_original_row"] == pytest.approx((w / row.norm()).item(), rel=1e-5)
    assert g["top_entries"][0] == [7, pytest.approx(w)]
    assert [f"{r['layer']}:{r['row']}" for r in g["rows"]] == ["1:5"]


def test_sparsity_of_the_oracle_needs_one_entry_and_random_k_does_not(oracle_run):
    _, results = oracle_run
    sp = results["sparsity"]
    assert [p["k"] for p in sp] == [1, 64]  # k = 1 answers every search: nothing between is measured
    assert sp[0]["nll_gap"] == pytest.approx(1.0, abs=1e-4) and sp[0]["kl"] < 1e-6
    assert all(p["nll_gap"] == pytest.approx(1.0, abs=1e-4) for p in sp)  # the other entries are zero
    # k random entries of a one-hot patch miss the one that matters (seeded draws: 1/64 chance each).
    assert sp[0]["random"]["nll_gap"] < 0.05 and sp[0]["random"]["draws"] == 2
    assert sp[-1]["random"] == {**sp[-1]["random"], "draws": 0} and sp[-1]["random"]["nll_gap"] == sp[-1]["nll_gap"]
    assert smallest_k([SparsityPoint(**p) for p in sp]) == 1
    assert sp[0]["by_contribution"]["nll_gap"] == pytest.approx(1.0, abs=1e-4)  # x*d ranks the one entry first


def _fake(gap: float):
    return Metrics(nll=1.0 - gap, ppl=1.0, kl=1.0 - gap, top1_agree=1.0, n_tokens=10)


@pytest.mark.parametrize("curves", [
    ({1: 0.1, 2: 0.3, 4: 0.5, 8: 0.7, 16: 0.85, 32: 0.93, 64: 0.97, 128: 0.99, 200: 1.0}, "top"),
    ({1: 0.0, 2: 0.0, 4: 0.2, 8: 0.95, 16: 0.96, 32: 0.99, 64: 0.995, 128: 1.0, 200: 1.0}, "contrib"),
    ({1: 0.95, 2: 0.97, 4: 0.98, 8: 0.99, 16: 0.99, 32: 0.99, 64: 0.99, 128: 1.0, 200: 1.0}, "top"),
    ({1: 0.0, 2: 0.0, 4: 0.0, 8: 0.0, 16: 0.0, 32: 0.1, 64: 0.5, 128: 0.8, 200: 0.85}, "top"),
])
def test_sparsity_search_finds_the_full_grids_smallest_k(curves):
    """Bisection over the grid lands on the smallest k the full grid finds, for both rankings and both targets
    (90%, and 90% of the full patch's recovery), on monotone curves, measuring fewer k."""
    curve, slow = curves
    other = {k: min(1.0, v + 0.3) if k > 1 else v for k, v in curve.items()}
    top, contrib = (curve, other) if slow == "top" else (other, curve)
    n = 200
    search = SparsitySearch.__new__(SparsitySearch)
    search.n, search.grid, search.draws, search.same, search.random_tokens = n, powers_of_two(n), 2, {}, None
    metrics = {"base": _fake(1.0), "broken": _fake(0.0), "patched": _fake(curve[n])}
    rounds = 0
    while True:
        todo, found = search.answers(metrics)
        if not todo:
            break
        rounds += 1
        for k in todo:
            metrics[TOP_K.name(k=k)], metrics[CONTRIB_K.name(k=k)] = _fake(top[k]), _fake(contrib[k])
    table = search.table(metrics)
    full = [SparsityPoint(k=k, **scored(_fake(top[k]), metrics["base"], metrics["broken"]).model_dump(),
                          by_contribution=scored(_fake(contrib[k]), metrics["base"], metrics["broken"]))
            for k in powers_of_two(n)]
    for target in (0.9, 0.9 * curve[n]):
        assert smallest_k(table, target) == smallest_k(full, target)
    assert smallest_k(table, 0.9, "by_contribution") == smallest_k(full, 0.9, "by_contribution")
    assert found >= {k for k in (smallest_k(full, 0.9), smallest_k(full, 0.9, "by_contribution")) if k}
    assert len(table) < len(full) and rounds <= 4


def test_super_activation_sweep_tokens_and_neurons(oracle_run, loaded):
    run, results = oracle_run
    sa = results["super_activation"]
    assert sa["patched"] == pytest.approx(sa["base"], rel=1e-5) and sa["broken"] < sa["base"] / 2
    sweep = {p["scale"]: p["metrics"] for p in results["sweep"]}
    assert set(sweep) == {1.0, 0.5, 0.0, -1.0, 2.0}
    assert [p["label"] for p in results["sweep"]] == ["base", "scale0.5", "scale0", "scale-1", "scale2"]
    assert sweep[1.0]["kl"] == 0 and sweep[0.0]["kl"] > sweep[0.5]["kl"] > 0
    t = results["tokens"]
    assert t["n_tokens"] == results["analysis"]["protocol"]["n_tokens"] > 200
    assert len(t["hurt"]) == len(t["healed"]) == len(t["rising"]) == 15
    assert t["hurt"][0]["sum"] >= t["hurt"][1]["sum"] > 0
    # The oracle heals exactly what the ablation hurt (same tokens, same sums).
    assert [x["id"] for x in t["healed"][:5]] == [x["id"] for x in t["hurt"][:5]]
    assert t["healed"][0]["sum"] == pytest.approx(t["hurt"][0]["sum"], rel=1e-3)
    assert sum(x["delta"] for x in t["rising"]) > 0
    neurons = results["neurons"]
    assert neurons[0]["neuron"] == 7 and len(neurons[0]["contexts"]) == 5
    c = neurons[0]["contexts"][0]
    assert c["contribution"] == pytest.approx(c["activation"] * neurons[0]["value"])
    assert abs(c["activation"]) >= abs(neurons[0]["contexts"][-1]["activation"])
    po = results["patch_output"]  # the oracle writes exactly what the ablation removed, through neuron 7 only
    assert po["value"] == pytest.approx(po["removed"], rel=1e-5) and abs(po["value"]) > 10 * po["median_abs"]
    assert po["top_neurons"][0]["neuron"] == 7 and po["top_neurons"][1]["contribution"] == 0
    on_disk = json.loads((run / "results.json").read_text())
    # earlier keys kept; the recipe is named as it ran: fast with four settings changed
    assert on_disk["sparsity"] == results["sparsity"]
    assert on_disk["recipe"] == "fast+steps=4+batch_size=2+seq_len=32+train_tokens=1024"


def test_the_sink_view_is_in_the_record_the_report_and_the_terminal(oracle_run, loaded):
    run, results = oracle_run
    sk = results["sinks"]
    assert sk["channel"] == "1:5" and sk["window"] == 64 and sk["windows"] == 4 and sk["n_tokens"] == 256
    assert [e["layer"] for e in sk["layers"]] == list(range(6))
    assert all(set(e["conditions"]) == {"base", "broken", "patched"} for e in sk["layers"])
    base = [e["conditions"]["base"] for e in sk["layers"]]
    broken = [e["conditions"]["broken"] for e in sk["layers"]]
    assert broken[1] != base[1] and broken[0] == base[0]  # the norm after the planted block changes
    assert all(broken[j]["sink_mass"] != base[j]["sink_mass"] for j in range(2, 6))
    assert all(e["entropy_undone"] == pytest.approx(1.0, abs=1e-3) for e in sk["layers"][2:])  # the oracle
    assert loaded.model.config._attn_implementation == "eager"  # as the tiny model was built, put back
    md = write_report(run)[0].read_text()
    assert "## Attention sinks: how the damage travels" in md and "](plots/sinks.png)" in md
    headline = md.split("## Summary")[0]
    assert "Mechanism: " in headline and "The patch " in headline
    buf = io.StringIO()
    print_analysis(Console(file=buf, width=200), RunDir(run).record())
    assert "Attention sink per layer from the ablated layer 1 on" in buf.getvalue() and "Mechanism: " in buf.getvalue()


def test_logit_lens_is_the_unembedding_column_through_the_norm(loaded):
    model, tok = loaded.model, loaded.tokenizer
    lens = logit_lens(model, tok, 1, 5)
    with torch.no_grad():
        e = torch.zeros(1, 1, 32)
        e[..., 5] = 1
        expected = model.lm_head(final_norm(model)(e))[0, 0]
    assert lens.top[0].id == int(expected.argmax())
    assert lens.bottom[0].id == int(expected.argmin())
    assert lens.top[0].logit == pytest.approx(expected.max().item(), rel=1e-4)


def test_share_below_gives_the_same_metrics(loaded):
    model = loaded.model
    ids = corpora.tokenize(loaded.tokenizer, corpora.load_text("pydoc", "eval"), 200)
    ab = Ablation(model, [COORD])
    conditions = {"broken": ab, "patched": Compose(ab, RowPatch(model, [(1, 5)], [oracle_vector(model) / 2]))}
    full = measure(model, ids, conditions, [(1, 5)], max_length=64)
    shared = measure(model, ids, conditions, [(1, 5)], max_length=64, scoring=Scoring(share_below=1))
    for name in full:
        assert shared[name].nll == pytest.approx(full[name].nll, rel=1e-5)
        assert shared[name].kl == pytest.approx(full[name].kl, rel=1e-4, abs=1e-7)
        assert shared[name].super_activation == pytest.approx(full[name].super_activation, rel=1e-5)
    with pytest.raises(ValueError, match="below share_below"):
        measure(model, ids, conditions, [(0, 5)], max_length=64, scoring=Scoring(share_below=1))


def test_analyze_without_results_is_one_clear_error(tmp_path, loaded):
    with pytest.raises(SuperweightError, match="no results.json"):
        run_analyze(loaded, tmp_path)


def test_powers_of_two_end_at_n():
    assert powers_of_two(1) == [1]
    assert powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]
    assert powers_of_two(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_geometry_of_a_two_row_patch_lists_both(loaded):
    model = loaded.model
    vecs = [oracle_vector(model), torch.ones(64)]
    g = geometry(model, [COORD], [(1, 5), (1, 6)], vecs, [down_projection(model, 1).get(5, 7).item()])
    assert [r.key for r in g.rows] == ["1:5", "1:6"] and g.row == 5
    assert g.rows[1].cols == [] and g.rows[1].norm == pytest.approx(8.0)


# ------------------------------------------------------------------------------------------------ sparsify


def test_pareto_keeps_only_undominated_points():
    pts = [{"nnz": 10, "nll_gap": 0.5}, {"nnz": 5, "nll_gap": 0.6}, {"nnz": 20, "nll_gap": 0.9},
           {"nnz": 30, "nll_gap": 0.8}, {"nnz": 5, "nll_gap": 0.2}]
    assert pareto(pts) == [{"nnz": 5, "nll_gap": 0.6}, {"nnz": 20, "nll_gap": 0.9}]


def test_l1_prox_shrinks_toward_exact_zeros(loaded):
    patch = RowPatch(loaded.model, [(1, 5)], [torch.tensor([0.05, -0.3, 1.0] + [0.0] * 61)])
    L1Prox(1.0).after_step(patch, lr=0.1)
    v = patch.vectors[0].detach()
    assert v[0] == 0 and v[1] == pytest.approx(-0.2) and v[2] == pytest.approx(0.9) and int((v != 0).sum()) == 2


def test_hard_concrete_gates_close_exactly_and_penalty_tracks_open_gates(loaded):
    patch = HardConcrete(1.0).patch(loaded.model, [(1, 5)], [torch.ones(64)])
    assert isinstance(patch, GatedRowPatch)
    with torch.no_grad():
        patch.p[0][:32] = -10.0
    final = HardConcrete(1.0).final(patch)[0]
    assert (final[:32] == 0).all() and (final[32:] == 1).all()
    assert patch.expected_open().item() == pytest.approx(0.5, abs=0.01)
    patch.training = True
    assert 0 < patch.vector(0)[40].item() <= 1  # sampled gates stay in [0, 1]


def test_sparsify_trains_sparser_patches_with_stronger_penalties(tmp_path, loaded):
    dense = oracle_vector(loaded.model) + 0.3 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    run = make_run(tmp_path, loaded, dense)
    before = snapshot(loaded.model)
    cfg = SparsifyConfig(strengths={"l1": (0.05, 2.0), "l0": (0.01, 1.0)}, steps=8, tokens=256, max_length=64)
    results = run_sparsify(loaded, run, cfg)
    assert_identical(loaded.model, before)
    st = results.sparse_training.model_dump()
    pts = {(p["method"], p["strength"]): p for p in st["points"]}
    assert set(pts) == {("l1", 0.05), ("l1", 2.0), ("l0", 0.01), ("l0", 1.0)}
    assert pts[("l1", 2.0)]["nnz"] < pts[("l1", 0.05)]["nnz"] <= 64
    assert all(0 <= p["nnz"] <= 64 and math.isfinite(p["nll_gap"]) for p in st["points"])
    assert st["frontier"] == pareto(st["points"]) and st["steps"] == 8
    for p in st["points"]:  # each sparse patch says what it is, against the deleted weight
        assert p["col"] == 7 and p["deleted_value"] == pytest.approx(40.0)
        assert p["norm"] == 0 or abs(p["cos_ablated_direction"] - p["value_at_col"] / p["norm"]) < 1e-6
    assert st["smallest_90"] == next((p for p in st["frontier"] if p["nll_gap"] >= 0.9), None)


def test_standalone_repair_and_analyze_count_their_model_work(oracle_run, loaded):
    """`repair` and `analyze` on their own stamp the record with their cost account (`run` counts them itself):
    repair trains (backward) and evaluates; analyze adds its stage beside repair's, in the same unit."""
    _, results = oracle_run
    cost = results["cost"]
    assert list(cost["stages"]) == ["repair", "analyze"]
    repair, analyze = cost["stages"]["repair"], cost["stages"]["analyze"]
    assert repair["backward"] > 0 and repair["parts"]["eval"] >= 1.0  # base + broken + patched over the eval text
    assert analyze["backward"] == 0 and analyze["forward"] > 0 and analyze["seconds"] > 0
    assert cost["layers"] == len(decoder_layers(loaded.model)) and cost["unit"] == cost["eval_tokens"] * cost["layers"]
    assert cost["total"] == pytest.approx(sum(s["forward"] + s["backward"] for s in cost["stages"].values()))


def test_sweep_on_its_subset_compares_every_scale_on_the_same_tokens(tmp_path, loaded, monkeypatch):
    """With more analysis tokens than SWEEP_TOKENS the scales and the random-k draws run on the first window only:
    base and scale 0 (the broken model) are read over those same tokens, while the rest keeps every token."""
    import superweight.stages.analyze as analyze

    monkeypatch.setattr(analyze, "SWEEP_TOKENS", 60)
    run = make_run(tmp_path, loaded, oracle_vector(loaded.model))
    r = run_analyze(loaded, run, AnalyzeConfig(tokens=256, draws=1, max_length=64, top_neurons=3))
    sweep = {p.scale: p.metrics for p in r.sweep}
    assert {m.n_tokens for m in sweep.values()} == {63}  # the first window: 64 - 1 scored tokens
    assert r.analysis.protocol.n_tokens > 63 and r.analysis.subset_tokens == 63
    # The random-k draws too, scored against base and broken over the same window: a one-hot patch's random
    # entry recovers nothing there either, and the top-k cut keeps every token.
    assert r.sparsity[0].random.draws == 1 and abs(r.sparsity[0].random.nll_gap) < 0.05
    assert r.sparsity[0].nll_gap == pytest.approx(1.0, abs=1e-4)
    assert sweep[1.0].kl == 0 and sweep[0.0].kl > sweep[0.5].kl > 0
    from superweight.measure.metrics import measure

    first = 64 - int(loaded.bos.on)  # the text tokens of the first window
    ids = corpora.tokenize(loaded.tokenizer, corpora.load_text(r.protocol.corpus, "eval"), 256)[:first]
    broken = measure(loaded.model, ids, {"broken": Ablation(loaded.model, [COORD])}, max_length=64, bos=loaded.bos)
    assert sweep[0.0].nll == pytest.approx(broken["broken"].nll, rel=1e-6)
    assert sweep[1.0].nll == pytest.approx(broken["base"].nll, rel=1e-6)


def test_a_cut_ranked_the_same_both_ways_is_measured_once(loaded):
    """When the k largest |x·d| are the k largest |d| (a one-hot patch), the two cuts are one patch: the search
    builds it once and reads the contribution ranking's point from it."""
    from superweight.core.patching import PatchData

    d = oracle_vector(loaded.model)
    patch = PatchData(rows=[(1, 5)], vectors=[d], ablated=[COORD], config=None)
    ablation = Ablation(loaded.model, [COORD])
    search = SparsitySearch(loaded.model, ablation, patch, 2, d.abs())  # ranks as |d| does
    assert [c.name for c in search.start()] == ["top1", "rand1_0", "rand1_1"] and search.same == {"contrib1": "top1"}
    other = SparsitySearch(loaded.model, ablation, patch, 2, torch.arange(d.numel()).float())  # another first entry
    assert [c.name for c in other.start()] == ["top1", "contrib1", "rand1_0", "rand1_1"] and other.same == {}
