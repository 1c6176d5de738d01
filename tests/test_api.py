"""The top-level API (`import superweight as sw`): each function once on a planted tiny llama, the same numbers as
the command it stands for, the notebook display of each result, the docstrings, and the quickstart notebook."""

from __future__ import annotations

import inspect
import json
import os
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import superweight as sw
from conftest import PLANT, invoke_cli

pytestmark = pytest.mark.usefixtures("torch_single_thread")
WEIGHT = ":".join(map(str, PLANT))  # 1:5:7
SMALL = dict(budget=4, batch_size=2, seq_len=32, eval_tokens=256)
NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "examples" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def m(planted_dir):
    return sw.load(str(planted_dir), dtype="fp32")  # (module fixtures run before the fp32 pin of conftest.py)


@pytest.fixture(scope="module")
def repaired(m, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "rep"
    return out, sw.repair(m, WEIGHT, out=out, **SMALL)


def shows_a_table(result, *words) -> str:
    page = result._repr_html_()
    assert page.startswith('<div class="superweight">') and "<table>" in page and "</table>" in page
    assert all(w in page for w in words), [w for w in words if w not in page]
    line = repr(result)
    assert line.startswith(type(result).__name__ + "(") and "\n" not in line and len(line) < 300, line
    return page


def test_import_superweight_loads_no_library_until_a_name_is_used():
    code = ("import sys, superweight as sw; assert 'torch' not in sys.modules and 'superweight.api' not in sys.modules;"
            " sw.detect; assert 'superweight.api' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from superweight import api

    assert sorted(sw.__all__) == sorted(api.__all__)
    assert all(getattr(sw, name) is getattr(api, name) for name in api.__all__)
    with pytest.raises(AttributeError):
        sw.no_such_name


def test_load_takes_the_cli_placement_settings(m, planted_dir):
    assert isinstance(m, sw.Loaded) and (m.dtype, m.device, m.bos) == ("fp32", "cpu", sw.Bos("auto"))
    assert inspect.signature(sw.load).parameters["dtype"].default == "auto"  # as the CLI's --dtype
    assert "model=" not in repr(m) and "spec=" in repr(m)  # a notebook shows where it came from, not the modules
    with pytest.raises(sw.SuperweightError, match="--max-memory and --offload-folder need --device-map"):
        sw.load(str(planted_dir), max_memory="cpu=1GiB")


def test_detect_is_the_command(m, tmp_path):
    found = sw.detect(m, calib_tokens=256, attribution_top=1)
    assert isinstance(found, sw.DetectResult) and found.candidates[0].coord == sw.parse_coord(WEIGHT)
    assert found.candidates[0].confirmed and found.settings["attribution_top"] == 1
    invoke_cli("detect", "--model", m.spec, "--calib-tokens", 256, "--attribution-top", 1,
               "--json", tmp_path / "d.json")
    cli = json.loads((tmp_path / "d.json").read_text())
    assert [c.model_dump() for c in found.candidates] == cli["candidates"]
    shows_a_table(found, "L:R:C", WEIGHT, "super weight")
    same = sw.detect(m, sw.DetectConfig(calib_tokens=256, attribution_top=1))
    assert same.candidates == found.candidates
    with pytest.raises(TypeError, match="unknown DetectConfig setting"):
        sw.detect(m, calib_token=256)


def test_evaluate_ablated_and_patched(m, repaired):
    out, _ = repaired
    ablated = sw.evaluate(m, ablate=WEIGHT, max_tokens=256, prompts=["def f(x):"], max_new_tokens=3)
    assert isinstance(ablated, sw.EvalResult) and ablated.ablated.kl > 0.05 and ablated.patched is None
    shows_a_table(ablated, "condition", "KL(base||·)", "Greedy generations", "def f(x):")
    patched = sw.evaluate(m, patch=out, max_tokens=256, prompts=["def f(x):"], max_new_tokens=3)
    assert patched.ablated.nll == ablated.ablated.nll and patched.patched.kl < patched.ablated.kl
    assert "patched PPL" in repr(patched)
    with pytest.raises(sw.SuperweightError, match="give ablate or patch, not both"):
        sw.evaluate(m, ablate=WEIGHT, patch=out)


def test_repair_is_the_command_with_the_lbfgs_default(m, repaired, tmp_path):
    out, fixed = repaired
    record = fixed.record
    # the recipe that ran: lbfgs with three options changed
    assert isinstance(fixed, sw.RepairResult) and fixed.run_dir == out
    assert isinstance(record, sw.RunRecord) and record.recipe == "lbfgs+max_evals=4+batch_size=2+seq_len=32"
    assert record.config.optimizer == "lbfgs" and record.config.max_evals == 4 and record.recovery.kl > 0
    invoke_cli("repair", "--model", m.spec, "--weight", WEIGHT, "--steps", 4, "--batch-size", 2, "--seq-len", 32,
               "--eval-tokens", 256, "--out", tmp_path / "cli")
    cli = sw.read_run(tmp_path / "cli")
    assert (cli.patched, cli.recovery, cli.patch) == (record.patched, record.recovery, record.patch)
    assert torch.equal(sw.load_patch(out).vectors[0], sw.load_patch(tmp_path / "cli").vectors[0])
    page = shows_a_table(fixed, f"Ablated weight {WEIGHT}", "data:image/png;base64,",
                        "training loss against step")
    assert page.count("<img") >= 2  # PPL/KL bars, and the loss curve read from the run directory's train log
    with pytest.raises(sw.SuperweightError, match="already holds a run"):
        sw.repair(m, WEIGHT, out=out, **SMALL)
    with pytest.raises(TypeError, match="unknown RepairConfig setting"):
        sw.repair(m, WEIGHT, out=tmp_path / "x", step=3)


def test_repair_without_out_writes_nothing_and_gives_the_same_patch(m, repaired, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default run directory would land here
    held = sw.repair(m, WEIGHT, **SMALL)
    assert held.run_dir is None and not held.unchanged and list(tmp_path.iterdir()) == []
    _, fixed = repaired  # the same repair into a run directory: the same patch and numbers
    assert torch.equal(held.patch.vectors[0], fixed.patch.vectors[0]) and held.patch.rows == fixed.patch.rows
    assert (held.record.patched, held.record.recovery) == (fixed.record.patched, fixed.record.recovery)
    assert held.patch.config.fingerprint == fixed.patch.config.fingerprint
    shows_a_table(held, f"Ablated weight {WEIGHT}")
    ids = torch.arange(2, 40).unsqueeze(0)
    with held.patch.apply():
        mine = m.model(ids).logits
    with fixed.patch.apply():
        assert torch.equal(m.model(ids).logits, mine)
    saved = held.patch.save(tmp_path / "kept")  # writing is the caller's choice
    assert torch.equal(sw.load_patch(saved).vectors[0], held.patch.vectors[0])
    with pytest.raises(sw.SuperweightError, match="resume continues a run directory"):
        sw.repair(m, WEIGHT, resume=True, **SMALL)


def test_interventions_are_context_managers(m, repaired):
    out, _ = repaired
    ids = torch.arange(2, 40).unsqueeze(0)
    base = m.model(ids).logits
    patch = sw.load_patch(out)
    with sw.Compose(sw.Ablation(m.model, patch.ablated), sw.RowPatch(m.model, patch.rows, patch.vectors)):
        patched = m.model(ids).logits
        assert not torch.equal(patched, base)
    assert torch.equal(m.model(ids).logits, base)
    # the handle and coordinate texts too
    with sw.Compose(sw.Ablation(m, WEIGHT), sw.RowPatch(m, ["1:5"], patch.vectors)):
        assert torch.equal(m.model(ids).logits, patched)
    with sw.Ablation(m, sw.parse_coord(WEIGHT)), sw.Spread(m, WEIGHT, 4):
        assert not torch.equal(m.model(ids).logits, base)
    assert torch.equal(m.model(ids).logits, base)
    with pytest.raises(TypeError, match="a loaded model handle"):
        sw.Ablation("not a model", WEIGHT)


def test_the_patch_you_hold(m, repaired, tmp_path):
    from tiny import assert_identical, snapshot

    out, fixed = repaired
    patch, ids = fixed.patch, torch.arange(2, 40).unsqueeze(0)
    before, base = snapshot(m.model), m.model(ids).logits
    with patch.apply():  # the ablated model, repaired (core.patching.patched)
        patched = m.model(ids).logits
        with pytest.raises(sw.SuperweightError, match="fingerprint differs"):
            patch.save(tmp_path / "inside")  # the model is not intact in here
    assert_identical(m.model, before)
    with sw.Compose(sw.Ablation(m, patch.ablated), sw.RowPatch(m, patch.rows, patch.vectors)):
        assert torch.equal(m.model(ids).logits, patched)
    again = sw.load_patch(out, m)  # the same Patch, from the run directory
    assert isinstance(again, sw.Patch) and again.rows == patch.rows and torch.equal(again.vectors[0], patch.vectors[0])
    saved = sw.load_patch(patch.save(tmp_path / "saved"), m)
    assert torch.equal(saved.vectors[0], patch.vectors[0]) and saved.config.fingerprint == patch.config.fingerprint
    with pytest.raises(sw.SuperweightError, match="holds a patch already"):
        patch.save(tmp_path / "saved")
    exported = patch.export(tmp_path / "merged")  # the model held stays intact
    assert_identical(m.model, before)
    merged = sw.load(str(exported), dtype="fp32")
    assert torch.allclose(merged.model(ids).logits, patched, atol=1e-4)
    config = patch.to_peft(tmp_path / "adapter")
    assert config["peft_type"] == "LORA" and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    written = sw.apply(m, out, export=tmp_path / "merged2", peft=tmp_path / "adapter2")  # the command's calls
    assert written["export"] == tmp_path / "merged2" and written["peft"] == config
    with pytest.raises(sw.SuperweightError, match="exists already"):
        sw.apply(m, patch, export=tmp_path / "merged")
    evaluated = sw.evaluate(m, patch=patch, max_tokens=256, prompts=["x"], max_new_tokens=1)
    assert evaluated.patched.kl < evaluated.ablated.kl
    with pytest.raises(sw.SuperweightError, match="holds no model"):
        sw.load_patch(out).merge()
    patch.merge()  # for good: the model is the merged one now
    assert torch.allclose(m.model(ids).logits, patched, atol=1e-4)
    for name, value in before.items():  # put back for the other tests
        m.model.state_dict()[name].copy_(value)
    assert_identical(m.model, before)


def test_info_sweep_and_sparsify_are_the_commands(m, repaired, tmp_path):
    found = sw.info(m)
    invoke_cli("info", "--model", m.spec, "--json", tmp_path / "i.json")
    assert found.as_json() == json.loads((tmp_path / "i.json").read_text()) and found.arch.n_layers == 6
    swept = sw.sweep(m, WEIGHT, scales=[1, 0], spread=None, max_tokens=256, prompts=["x"], max_new_tokens=1)
    assert [p.scale for p in swept.points] == [1.0, 0.0] and swept.points[1].metrics.kl > 0.05
    with pytest.raises(sw.SuperweightError, match="without @SCALE"):
        sw.sweep(m, WEIGHT + "@0.5")
    out, _ = repaired
    record = sw.sparsify(m, out, strengths={"l1": (1.0,)}, steps=2, tokens=256)
    assert record.sparse_training and sw.read_run(out).sparse_training == record.sparse_training


def test_census_is_the_command(m, tmp_path):
    outcome = sw.census([m.spec], out=tmp_path / "census", calib_tokens=256, attribution_top=1)
    assert [r.model for r in outcome.rows] == [m.spec] and not outcome.failed
    assert (tmp_path / "census" / "census.csv").is_file()
    again = sw.census([m.spec], out=tmp_path / "census", calib_tokens=256, attribution_top=1)
    assert again.skipped == [m.spec]


def test_analyze_read_run_and_compare(m, repaired, tmp_path):
    out, _ = repaired
    record = sw.analyze(m, out, tokens=256, draws=1)
    assert isinstance(record, sw.RunRecord) and record.sparsity and sw.read_run(out).sparsity == record.sparsity
    shows_a_table(sw.read_run(out), "Sparsity", "NLL-gap recovery against k non-zero entries")
    rows = sw.compare(out, out)
    assert isinstance(rows, sw.Comparison) and isinstance(rows, list) and len(rows) == 2
    assert isinstance(rows[0], sw.CompareRow) and rows[0].run == "rep"
    shows_a_table(rows, "NLL-gap rec.", "rep")


def test_run_the_whole_study(m, tmp_path):
    record = sw.run(m, out=tmp_path / "run", eval_tokens=256, analysis_tokens=256, draws=1, baselines=False, budget=4)
    assert isinstance(record, sw.RunRecord) and record.detect.weight == WEIGHT and record.config.budget == 4
    assert (tmp_path / "run" / "report.html").is_file() and set(record.timings) >= {"detect", "repair", "report"}
    shows_a_table(record, "Detection", "Super weight")
    again = sw.run(m, out=tmp_path / "run", resume=True)  # finished: returned as it is
    assert again.timings == record.timings


def test_quantize(m):
    result = sw.quantize(m, blocks=(32, "channel"), keep=WEIGHT, max_tokens=256)
    assert isinstance(result, sw.QuantResult) and result.keep == [WEIGHT] and result.keep_source == "given"
    assert {r.name for r in result.rows} >= {"4b/32/rtn", "4b/channel/clip+restore"}
    shows_a_table(result, "Quantization", "bits/weight", "data:image/png;base64,")
    auto = sw.quantize(m, blocks=["channel"], clip="none", max_tokens=256)  # no published weight: detected
    assert (auto.keep, auto.keep_source) == ([WEIGHT], "detected")


def test_every_setting_is_documented_with_its_default():
    for fn in (sw.load, sw.detect, sw.evaluate, sw.repair, sw.analyze, sw.run, sw.quantize, sw.compare, sw.info,
               sw.apply, sw.census, sw.load_patch, sw.sweep, sw.sparsify):
        doc = pydoc.render_doc(fn, renderer=pydoc.plaintext)
        for name, p in inspect.signature(fn).parameters.items():
            if p.kind is p.VAR_KEYWORD or p.kind is p.VAR_POSITIONAL:
                assert f"*{name}:" in doc, (fn.__name__, name)
            elif p.default is p.empty:
                assert f"{name}:" in doc, (fn.__name__, name)
            else:
                assert f"{name}={p.default!r}:" in doc, (fn.__name__, name)
    for fn, settings in ((sw.repair, sw.RECIPES["lbfgs"]), (sw.detect, sw.DetectConfig())):
        doc = pydoc.render_doc(fn, renderer=pydoc.plaintext)
        for name, value in settings.model_dump().items():
            assert f"{name}={value!r}:" in doc, (fn.__name__, name)


def test_quickstart_notebook_runs_and_shows_tables(tmp_path, monkeypatch, planted_dir):
    """Every cell of the quickstart runs in a real Jupyter kernel and shows its tables and plots. On the planted tiny
    llama instead of the notebook's default model: the cells, the API and the displays are what is tested here (the
    embedded model's detection, repair and CLI run are test_e2e.py's, on the session's one copy of it)."""
    import inspect

    import nbclient
    import nbformat

    # The kernel imports this checkout's superweight, whatever the environment has installed.
    src = str(Path(sw.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    # One thread unless told otherwise: tiny ops on 2 busy cores pay an OpenMP barrier each.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert 10 <= sum(c.cell_type == "code" for c in nb.cells) <= 16
    loads = [c for c in nb.cells if c.cell_type == "code" and "sw.load()" in c.source]
    assert len(loads) == 1 and inspect.signature(sw.load).parameters["model"].default == "smollm2-135m"
    loads[0].source = loads[0].source.replace("sw.load()", f"sw.load({str(planted_dir)!r})")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    pages = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if "text/html" in o.get("data", {})]
    assert any("Super-weight candidates" in p and "<table>" in p for p in pages)  # detection
    assert any("KL(base||·)" in p and "<table>" in p for p in pages)  # evaluation
    assert any("NLL-gap recovery" in p and "data:image/png;base64," in p for p in pages)  # the run
