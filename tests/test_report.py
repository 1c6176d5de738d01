"""report.py on synthetic run directories: no model, only results.json (+ train_log.jsonl) in tmp_path."""

from __future__ import annotations

import json
import re

import pytest

from superweight.errors import SuperweightError
from superweight.report import compare_rows, write_report

D_FF = 64
KS = [1, 2, 4, 8, 16, 32, 64]


def _metrics(nll: float, kl: float, act: float) -> dict:
    import math

    return {"nll": nll, "ppl": math.exp(nll), "kl": kl, "top1_agree": 1 - kl / 3, "super_activation": act,
            "super_activation_by_channel": {"3:5": act}, "n_tokens": 2048}


def _minimal() -> dict:
    """Only what `repair` without options writes."""
    return {
        "protocol": {"model": "tiny/llama (test)", "corpus": "pydoc", "split": "eval", "n_tokens": 2048,
                     "max_length": 256, "stride": 256, "dtype": "fp32", "device": "cpu",
                     "interventions": {"broken": "ablate 3:5:17",
                                       "patched": "ablate 3:5:17, add patch on rows 3:5"},
                     "provenance": {"superweight": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0",
                                    "python": "3.11.7", "date": "2026-01-01T00:00:00+00:00", "git": "abc1234"}},
        "recipe": "fast", "config": {"steps": 40, "lr": 0.1, "seed": 0},
        "base": _metrics(3.0, 0.0, 20000.0), "broken": _metrics(5.0, 1.8, 6000.0),
        "patched": _metrics(3.125, 0.09, 15000.0),
        "recovery": {"nll_gap": 0.9375, "kl": 0.95},
        "training": {"steps": 40, "seconds": 80.0, "s_per_step": 2.0, "final_loss": 0.2, "resumed_from": None,
                     "teacher_cached": True},
        "patch": {"layer": 3, "row": 5, "norm": 46.5, "cos_original_row": 0.19, "col": 17, "value_at_col": 2.02,
                  "deleted_value": 5.876, "cos_ablated_direction": 0.043,
                  "cols": [{"col": 17, "value_at_col": 2.02, "deleted_value": 5.876,
                            "cos_ablated_direction": 0.043}],
                  "top_entries": [[42, -2.88], [7, 2.79], [17, 2.02]]},
    }


def _full(gaps=(0.1, 0.3, 0.5, 0.7, 0.85, 0.92, 0.96)) -> dict:
    r = _minimal()
    r["patch"]["rows"] = [dict(r["patch"])]
    r["generations"] = [{"prompt": "Tokens <s> and </script>", "base": " fine.\nNext line",
                         "broken": " <s><s></script>", "patched": " fine & well"}]
    r["baselines"] = {"oracle": {**_metrics(3.0, 1e-11, 20000.0), "recovery": {"nll_gap": 1.0, "kl": 1.0}},
                      "random_same_norm_1": {**_metrics(4.5, 1.2, 7000.0),
                                             "recovery": {"nll_gap": 0.25, "kl": 0.33}}}
    r["seeds"] = {"values": [{"seed": s, "nll_gap": 0.93 + s / 100, "kl": 0.95, "norm": 46.0 + s,
                              "cos_original_row": 0.2} for s in range(3)],
                  "mean": {"nll_gap": 0.94, "kl": 0.95, "norm": 47.0, "cos_original_row": 0.2},
                  "std": {"nll_gap": 0.01, "kl": 0.0, "norm": 1.0, "cos_original_row": 0.0}}
    r["detect"] = {"weight": "3:5:17", "protocol": {"corpus": "pydoc", "n_tokens": 512},
                   "candidates": [{"layer": 3, "row": 5, "col": 17, "value": 5.876, "kl": 1.8, "ppl_ratio": 6.7,
                                   "confirmed": True, "source": "activation"},
                                  {"layer": 2, "row": 9, "col": 3, "value": -1.2, "kl": 0.01, "ppl_ratio": 1.01,
                                   "confirmed": False, "source": "weight"}]}
    r["analysis"] = {"protocol": {"corpus": "pydoc", "split": "eval", "n_tokens": 1024}, "seconds": 3.0}
    r["super_activation"] = {"base": 20000.0, "broken": 6000.0, "patched": 15000.0}
    r["sparsity"] = [{"k": k, "nll": 5 - 2 * g, "ppl": 100.0, "kl": 1.8 * (1 - g), "nll_gap": g,
                      "kl_recovery": g,
                      "by_contribution": {"nll": 3.0, "ppl": 20.0, "kl": 0.05, "nll_gap": 0.97, "kl_recovery": 0.97},
                      "random": {"nll": 5.0, "ppl": 148.0, "kl": 1.8, "nll_gap": g / 10, "kl_recovery": g / 10,
                                 "draws": 4}} for k, g in zip(KS, gaps)]
    point = {"nll": 3.2, "ppl": 24.5, "kl": 0.1, "kl_recovery": 0.94, "seconds": 5.0}
    points = [{**point, "method": "l1", "strength": 0.01, "nnz": 12, "nll_gap": 0.91},
              {**point, "method": "l0", "strength": 0.1, "nnz": 6, "nll_gap": 0.8},
              {**point, "method": "l0", "strength": 0.01, "nnz": 20, "nll_gap": 0.9}]
    r["sparse_training"] = {"protocol": {"steps": 40}, "steps": 40, "points": points,
                            "frontier": [points[1], points[0]], "smallest_90": points[0]}
    r["tokens"] = {
        "hurt": [{"token": "</script>", "id": 11, "count": 3, "sum": 9.5, "mean": 3.17},
                 {"token": "\n", "id": 12, "count": 5, "sum": 4.0, "mean": 0.8}],
        "healed": [{"token": " the", "id": 13, "count": 7, "sum": 6.0, "mean": 0.86}],
        "rising": [{"token": "<s>", "id": 1, "base_prob": 0.001, "broken_prob": 0.05, "delta": 0.049}],
        "logit_lens": {"layer": 3, "row": 5, "top": [{"token": " up", "id": 20, "logit": 3.5}],
                       "bottom": [{"token": " down", "id": 21, "logit": -3.1},
                                  {"token": "x", "id": 22, "logit": -2}]},
    }
    r["neurons"] = [{"neuron": 42, "value": -2.88, "contexts": [
        {"text": "if a < b:\n    return", "token": " </script>", "position": 9, "activation": 1.5,
         "contribution": -4.32}]}]
    r["patch_output"] = {"text": "", "token": "<s>", "position": 0, "value": 1234.5, "median_abs": 0.5,
                         "removed": 2000.0, "top_neurons": [{"neuron": 7, "x": 300.0, "d": 2.0, "contribution": 600.0}]}
    r["sweep"] = [{"scale": s, "nll": 3 + (1 - s) ** 2, "ppl": 20.0 * (1 + (1 - s) ** 2), "kl": (1 - s) ** 2,
                   "top1_agree": 0.9, "super_activation": 20000.0 * s} for s in (-1.0, 0.0, 0.5, 1.0, 2.0)]
    r["timings"] = {"detect": 10.0, "repair": 80.0, "analyze": 3.0}
    return r


def _run_dir(path, results: dict, log: bool = True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    if log:
        lines = [json.dumps({"step": s, "loss": 1.5 / s, "lr": 0.1, "seconds": 2.0 * s}) for s in range(1, 41)]
        (path / "train_log.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 41, "lo', encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run = _run_dir(tmp_path_factory.mktemp("full"), _full())
    md, page = write_report(run)
    return run, md.read_text(encoding="utf-8"), page.read_text(encoding="utf-8")


SECTIONS = ["Summary", "Seeds", "Detection", "Training", "Perplexity and KL", "The patch", "Sparsity",
            "Scale sweep", "Tokens", "Neurons the patch listens to", "Generations", "Protocol and versions"]


def test_report_files_and_plots(full_report):
    run, md, page = full_report
    assert (run / "report.md").is_file() and (run / "report.html").is_file()
    for name in ("loss", "ppl_kl", "sparsity", "sweep"):
        assert (run / "plots" / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
        assert f"](plots/{name}.png)" in md
    assert not list(run.glob(".*.tmp")) and not list((run / "plots").glob(".*.tmp"))


def test_html_is_self_contained(full_report):
    _, _, page = full_report
    assert 'src="plots/' not in page and "<img src=\"plots/" not in page
    assert page.count('src="data:image/png;base64,') == 4
    assert "<script" not in page and "<link" not in page


def test_sections_in_order(full_report):
    _, md, page = full_report
    assert md.startswith("# Super weight 3:5:17 in tiny/llama\n")
    positions = [page.index(f"<h2>{s}</h2>") for s in SECTIONS]
    assert positions == sorted(positions)
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == SECTIONS


def test_data_text_is_escaped(full_report):
    _, md, page = full_report
    assert "</script>" not in page and "<s>" not in page
    assert "&lt;/script&gt;" in page and "&#x27;&lt;s&gt;&#x27;" in page  # token shown as repr: '<s>'
    assert "&#x27;\\n&#x27;" in page and "&#x27; the&#x27;" in page  # whitespace visible in tokens
    assert "fine &amp; well" in page and "fine.\\nNext line" in page
    assert "<b> &lt;/script&gt;</b>" in page  # the neuron context's token, emphasised
    assert "</script>" not in md and "<s>" not in md


def test_numbers_formatted(full_report):
    _, md, page = full_report
    headline = md.split("\n\n")[1]
    assert headline == ("Zeroing W\\[3:5:17\\] (layer:row:col of the MLP down-projection) takes PPL from "
                        "20.09 to 148.41; a row patch of norm 46.5 recovers 93.8% of the NLL gap (PPL 22.76).")
    assert re.search(r"<td>patched</td><td class=\"num\">3\.125</td><td class=\"num\">22\.76</td>", page)
    assert "| base | 3 | 20.09 | 0 | 100.0% | 20,000 | – | – |" in md
    assert "| mean ± std | 94.0% ± 1.0% | 95.0% ± 0.0% | 47 ± 1 | 0.2 ± 0 |" in md
    assert "40 steps, 80 s (2 s/step), final loss 0.2; recipe fast." in md


def test_patch_output_is_reported(full_report):
    _, md, page = full_report
    assert "Where the patch writes" in page and "token &#x27;&lt;s&gt;&#x27;" in page
    assert "1,234 (x" not in page and "against a median |x·d| of 0.5" in page
    assert "the ablation removed 2,000 there" in page


def test_sparsity_answers(full_report):
    _, md, page = full_report
    assert "Smallest top-k patch keeping 90% of the full patch&#x27;s recovery (96.0%): k = 32." in page
    assert "<p>Smallest top-k patch recovering &gt;= 90% of the NLL gap: k = 32 of 64.</p>" in page
    assert "<p>Smallest trained sparse patch recovering &gt;= 90%: nnz = 12 (l1, strength 0.01).</p>" in page
    assert "| 64 | 96.0% | 96.0% | 0.072 | 97.0% | 9.6% | 1.8 |" in md
    assert "Smallest by-|x·d| patch recovering &gt;= 90%: k = 1." in page
    assert ("keeping only the 1 with the largest x·d at the massive-activation token recovers 97.0%; keeping the 1 "
            "largest by magnitude recovers") in page
    assert "a patch of 12 non-zero entries recovers" in page


def test_minimal_run_renders_without_analysis(tmp_path):
    run = _run_dir(tmp_path / "min", _minimal(), log=False)
    md_path, html_path = write_report(run)
    md, page = md_path.read_text(), html_path.read_text()
    for absent in ("Sparsity", "Seeds", "Detection", "Scale sweep", "Tokens", "Neurons", "Generations"):
        assert f"## {absent}" not in md and f"<h2>{absent}" not in page
    assert "## Summary" in md and "## The patch" in md and "## Protocol and versions" in md
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["ppl_kl.png"]
    assert page.count("data:image/png;base64,") == 1


def test_old_format_patch_keyed_by_row(tmp_path):
    r = _minimal()
    r["patch"] = {"3:5": {"norm": 46.5, "cos_original_row": 0.19, "top_entries": [[1, 2.0]],
                          "col17": {"value_at_col": 2.02, "deleted_value": 5.876,
                                    "cos_ablated_direction": 0.04}}}
    md = write_report(_run_dir(tmp_path / "old", r, log=False))[0].read_text()
    assert "| d\\[col\\] vs deleted value | 2.02 vs 5.876 |" in md
    assert compare_rows([tmp_path / "old"])[0]["value_at_col"] == 2.02


def test_missing_or_bad_results(tmp_path):
    with pytest.raises(SuperweightError, match="no results.json in .*nothing"):
        write_report(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    with pytest.raises(SuperweightError, match="not valid JSON"):
        write_report(tmp_path / "bad")
    with pytest.raises(SuperweightError, match="nothing"):
        compare_rows([_run_dir(tmp_path / "ok", _minimal(), log=False), tmp_path / "nothing"])


def test_compare_rows(tmp_path):
    a = _run_dir(tmp_path / "a", _full(), log=False)
    b = _run_dir(tmp_path / "b", _full(gaps=(0.2, 0.5, 0.91, 0.95, 0.97, 0.99, 1.0)), log=False)
    late = _full(gaps=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
    late["sparse_training"]["smallest_90"] = None
    c = _run_dir(tmp_path / "c", late, log=False)
    rows = compare_rows([a, b, str(c), _run_dir(tmp_path / "m", _minimal(), log=False)])
    assert [r["run"] for r in rows] == ["a", "b", "c", "m"]
    assert [r["k90"] for r in rows] == [32, 4, None, None]
    assert [r["sparse_nnz90"] for r in rows] == [12, 12, None, None]
    assert rows[0] | {"run": None} == {
        "run": None, "model": "tiny/llama (test)", "weight": "3:5:17", "recipe": "fast", "steps": 40, "seed": 0,
        "base_ppl": pytest.approx(20.0855, rel=1e-4), "broken_ppl": pytest.approx(148.413, rel=1e-4),
        "patched_ppl": pytest.approx(22.7599, rel=1e-4), "nll_gap": 0.9375, "kl_recovery": 0.95, "norm": 46.5,
        "cos_original_row": 0.19, "value_at_col": 2.02, "k90": 32, "k90_contribution": 1, "sparse_nnz90": 12,
        "seeds": 3, "seeds_nll_gap_mean": pytest.approx(0.94), "seeds_nll_gap_std": pytest.approx(0.01),
        "n_tokens": 2048, "seconds": 80.0}
    assert rows[3]["weight"] == "3:5:17"  # from protocol.interventions when there is no detect
    page = write_report(c)[1].read_text()
    assert "NLL gap: none does.</p>" in page and "&gt;= 90%: none does.</p>" in page
