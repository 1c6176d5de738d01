"""The report and compare on run directories written by real runs of a planted tiny llama (conftest.py), and on
results.json files that the previous version (schema 1) wrote (tests/data/v1)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from superweight.errors import SuperweightError
from superweight.schema.record import smallest_k
from superweight.io.rundir import RunDir
from superweight.report import compare_rows, write_report
from superweight.report.format import num, pct, ppl

V1 = Path(__file__).parent / "data" / "v1"


@pytest.fixture(scope="module")
def full_report(pipeline_run):
    run = pipeline_run[0]
    md, page = write_report(run)
    return run, md.read_text(encoding="utf-8"), page.read_text(encoding="utf-8")


SECTIONS = ["Summary", "Seeds", "Detection", "Training", "Perplexity and KL", "The patch", "Sparsity",
            "Scale sweep", "Attention sinks: how the damage travels", "Tokens", "Neurons the patch listens to", "Generations", "Protocol and versions"]


def test_report_files_and_plots(full_report):
    run, md, page = full_report
    assert (run / "report.md").is_file() and (run / "report.html").is_file()
    for name in ("loss", "ppl_kl", "sparsity", "sweep", "sinks"):
        assert (run / "plots" / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
        assert f"](plots/{name}.png)" in md
    assert not list(run.glob(".*.tmp")) and not list((run / "plots").glob(".*.tmp"))


def test_html_is_self_contained(full_report):
    _, _, page = full_report
    assert 'src="plots/' not in page and "<img src=\"plots/" not in page
    assert page.count('src="data:image/png;base64,') == 5
    assert "<script" not in page and "<link" not in page


def test_sections_in_order(full_report):
    run, md, page = full_report
    assert md.startswith(f"# Super weight 1:5:7 in {RunDir(run).record().protocol.model}\n")
    positions = [page.index(f"<h2>{s}</h2>") for s in SECTIONS]
    assert positions == sorted(positions)
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == SECTIONS


def test_data_text_is_escaped(pipeline_run, tmp_path):
    # The real record, with model-written text that looks like markup: it must be shown, never obeyed.
    run = tmp_path / "run"
    shutil.copytree(pipeline_run[0], run)
    r = RunDir(run).record()
    r.generations = [{"prompt": "Tokens <s> and </script>", "base": " fine.\nNext line", "broken": " <s><s></script>",
                      "patched": " fine & well"}]
    r.tokens.hurt[0].token, r.tokens.hurt[1].token, r.tokens.healed[0].token = "</script>", "\n", " the"
    r.tokens.rising[0].token = "<s>"
    r.neurons[0].contexts[0].token = " </script>"
    RunDir(run).write(r)
    md, page = (p.read_text(encoding="utf-8") for p in write_report(run))
    assert "</script>" not in page and "<s>" not in page
    assert "&lt;/script&gt;" in page and "&#x27;&lt;s&gt;&#x27;" in page  # token shown as repr: '<s>'
    assert "&#x27;\\n&#x27;" in page and "&#x27; the&#x27;" in page  # whitespace visible in tokens
    assert "fine &amp; well" in page and "fine.\\nNext line" in page
    assert "<b> &lt;/script&gt;</b>" in page  # the neuron context's token, emphasised
    assert "</script>" not in md and "<s>" not in md


def test_number_formats():
    assert (ppl(20.0855), ppl(148.413), ppl(2.5e6), ppl(None)) == ("20.09", "148.41", "2.50e+06", "–")
    assert (num(20000.0), num(3.125), num(0.0), num(46.5), num(None), num(True)) == (
        "20,000", "3.125", "0", "46.5", "–", "yes")
    assert (pct(0.9375), pct(1.0), pct(None)) == ("93.8%", "100.0%", "–")


def test_numbers_formatted(full_report):
    run, md, page = full_report
    r = RunDir(run).record()
    headline = md.split("\n\n")[1]
    assert headline == (f"Zeroing W\\[1:5:7\\] (layer:row:col of the MLP down-projection) takes PPL from "
                        f"{ppl(r.base.ppl)} to {ppl(r.broken.ppl)}; a row patch writing {num(r.patch.write_vs_removed)}x "
                        "what the ablation removed (RMS over tokens) "
                        f"recovers {pct(r.recovery.nll_gap)} of the NLL gap (PPL {ppl(r.patched.ppl)}).")
    p = r.patched
    assert re.search(rf'<td>patched</td><td class="num">{re.escape(num(p.nll))}</td>'
                     rf'<td class="num">{re.escape(ppl(p.ppl))}</td>', page)
    b = r.base
    assert (f"| base | {num(b.nll)} | {ppl(b.ppl)} | 0 | 100.0% | {num(b.super_activation)} | – | – |") in md
    mean, std = r.seeds.mean, r.seeds.std
    assert (f"| mean ± std | {pct(mean.nll_gap)} ± {pct(std.nll_gap)} | {pct(mean.kl)} ± {pct(std.kl)} | "
            f"{num(mean.norm)} ± {num(std.norm)} |") in md
    t = r.training
    assert (f"{t.steps} steps, {num(t.seconds)} s ({num(t.s_per_step)} s/step), final loss {num(t.final_loss)}; "
            f"recipe {r.recipe.replace('_', chr(92) + '_')}.") in md  # markdown escapes "max_evals"


def test_patch_output_is_reported(full_report):
    run, md, page = full_report
    po = RunDir(run).record().patch_output
    assert "Where the patch writes" in page and f"token &#x27;{po.token}&#x27;" in page
    assert f"against a median |x·d| of {num(po.median_abs)}" in page
    assert f"the ablation removed {num(po.removed)} there" in page


def test_sparsity_answers(full_report):
    run, md, page = full_report
    r = RunDir(run).record()
    sp, dense = r.sparsity, r.sparsity[-1].nll_gap
    k, kr, kc = smallest_k(sp), smallest_k(sp, 0.9 * dense), smallest_k(sp, ranking="by_contribution")
    said = lambda k: f"k = {k}." if k is not None else "none."  # noqa: E731
    assert (f"Smallest top-k patch keeping 90% of the full patch&#x27;s recovery ({pct(dense)}): "
            f"{said(kr)}") in page
    assert ("<p>Smallest top-k patch recovering &gt;= 90% of the NLL gap: "
            + (f"k = {k} of 64.</p>" if k is not None else "none does.</p>")) in page
    assert ("Smallest by-|x·d| patch recovering &gt;= 90%: " + (f"k = {kc}." if kc else "none does.")) in page
    s90 = r.sparse_training.smallest_90
    assert ("<p>Smallest trained sparse patch recovering &gt;= 90%: "
            + (f"nnz = {s90.nnz} ({s90.method}, strength {num(s90.strength)}).</p>" if s90 else "none does.</p>")
            ) in page
    last = sp[-1]
    assert (f"| 64 | {pct(last.nll_gap)} | {pct(last.kl_recovery)} | {num(last.kl)} | "
            f"{pct(last.by_contribution.nll_gap)} | {pct(last.random.nll_gap)} | {num(last.random.kl)} |") in md
    if kc is not None:
        best = next(e for e in sp if e.k == kc)
        assert (f"keeping only the {kc} with the largest x·d at the massive-activation token recovers "
                f"{pct(best.by_contribution.nll_gap)}; keeping the {kc} largest by magnitude recovers") in page
    if s90:
        assert f"a patch of {s90.nnz} non-zero entries recovers" in page


def test_minimal_run_renders_without_analysis(repair_runs):
    run = repair_runs["minimal"][0]
    md_path, html_path = write_report(run)
    md, page = md_path.read_text(), html_path.read_text()
    for absent in ("Sparsity", "Seeds", "Detection", "Scale sweep", "Tokens", "Neurons"):
        assert f"## {absent}" not in md and f"<h2>{absent}" not in page
    assert "## Summary" in md and "## The patch" in md and "## Protocol and versions" in md
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["loss.png", "ppl_kl.png"]
    assert page.count("data:image/png;base64,") == 2


def test_two_row_patch_shows_both_rows(repair_runs):
    run = repair_runs["two_rows"][0]
    md = write_report(run)[0].read_text()
    rows = RunDir(run).record().patch.rows
    assert [(g.layer, g.row) for g in rows] == [(1, 5), (1, 9)]
    assert "| layer | row | norm | cos(d, original row) |" in md
    for g in rows:
        assert f"| {g.layer} | {g.row} | {num(g.norm)} | {num(g.cos_original_row)} |" in md


def test_version_1_runs_are_migrated(tmp_path):
    # results.json as the previous version wrote it (patch rows keyed "L:R"): the report used to crash on it.
    run = tmp_path / "two_rows"
    shutil.copytree(V1 / "two_rows", run)
    raw = json.loads((run / "results.json").read_text())
    assert "schema_version" not in raw and set(raw["patch"]["rows"]) == {"1:5", "1:9"}
    md = write_report(run)[0].read_text()
    assert "| layer | row | norm | cos(d, original row) |" in md and "| 1 | 9 |" in md
    assert compare_rows([run])[0].value_at_col == raw["patch"]["value_at_col"]


def test_oldest_format_patch_keyed_by_row(tmp_path):
    # Older still, the whole patch was keyed by row: {"1:5": {norm, ..., "col7": {value_at_col, ...}}}.
    run = tmp_path / "old"
    shutil.copytree(V1 / "two_rows", run)
    raw = json.loads((run / "results.json").read_text())
    g = raw["patch"]["rows"]["1:5"]
    raw["patch"] = {"1:5": {"norm": g["norm"], "cos_original_row": g["cos_original_row"],
                            "top_entries": g["top_entries"],
                            "col7": {k: g[k] for k in ("value_at_col", "deleted_value", "cos_ablated_direction")}}}
    (run / "results.json").write_text(json.dumps(raw))
    md = write_report(run)[0].read_text()
    assert f"| d\\[col\\] vs deleted value | {num(g['value_at_col'])} vs {num(g['deleted_value'])} |" in md
    assert compare_rows([run])[0].value_at_col == g["value_at_col"]


def test_missing_or_bad_results(tmp_path, repair_runs):
    with pytest.raises(SuperweightError, match="no results.json in .*nothing"):
        write_report(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    with pytest.raises(SuperweightError, match="not valid JSON"):
        write_report(tmp_path / "bad")
    with pytest.raises(SuperweightError, match="nothing"):
        compare_rows([repair_runs["minimal"][0], tmp_path / "nothing"])


def test_compare_rows(repair_runs, pipeline_run):
    runs = [repair_runs["one_row"][0], repair_runs["two_rows"][0], str(pipeline_run[0]), repair_runs["minimal"][0]]
    rows = compare_rows(runs)
    assert [r.run for r in rows] == ["one_row", "two_rows", "full", "minimal"]
    records = [RunDir(r).record() for r in runs]
    assert [r.k90 for r in rows] == [smallest_k(x.sparsity) if x.sparsity else None for x in records]
    assert [r.sparse_nnz90 for r in rows] == [
        x.sparse_training.smallest_90.nnz if x.sparse_training and x.sparse_training.smallest_90 else None
        for x in records]
    r, x = rows[0], records[0]
    assert r.model_dump() | {"run": None} == {
        "run": None, "model": x.protocol.model, "weight": "1:5:7", "recipe": x.recipe, "steps": x.training.steps, "seed": 0,
        "base_ppl": x.base.ppl, "broken_ppl": x.broken.ppl, "patched_ppl": x.patched.ppl,
        "nll_gap": x.recovery.nll_gap, "kl_recovery": x.recovery.kl, "norm": x.patch.norm,
        "cos_original_row": x.patch.cos_original_row, "value_at_col": x.patch.value_at_col,
        "write_rms": x.patch.write_rms, "write_vs_removed": x.patch.write_vs_removed,
        "balanced_norm": x.patch.balanced_norm, "k90": smallest_k(x.sparsity), "k90_contribution": smallest_k(x.sparsity, ranking="by_contribution"),
        "sparse_nnz90": rows[0].sparse_nnz90, "seeds": 2, "seeds_nll_gap_mean": x.seeds.mean.nll_gap,
        "seeds_nll_gap_std": x.seeds.std.nll_gap, "n_tokens": x.protocol.n_tokens, "seconds": x.training.seconds,
        "excluded": None, "regime": "restoration"}
    assert rows[3].weight == "1:5:7" and rows[3].k90 is None  # from protocol.interventions when there is no detect
    assert rows[2].weight == "1:5:7" and rows[2].seeds == 2
