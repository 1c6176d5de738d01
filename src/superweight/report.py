"""Turn a run directory into plots, a markdown report and one self-contained HTML page.

    md, page = write_report("runs/xb")         # runs/xb/report.md, runs/xb/report.html, runs/xb/plots/*.png
    rows = compare_rows(["runs/xb", "runs/xc"])  # one flat dict per run, for a comparison table
    print(md.read_text())

The document is built once as a list of blocks (heading, paragraph, table, image) and rendered twice, so the
two files cannot drift. Sections only hold plain text; the renderers escape every string, so a token such as
'</script>' is shown, never obeyed. Each section appears only when its keys exist (see docs/results.md).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from superweight.errors import SuperweightError
from superweight.runs import write_atomic

DASH = "–"
CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0;font-size:13px}th{background:#f3f3f3}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}b{background:#fe9}"""


# --- formatting: 4 significant digits for NLL/KL, PPL with 2 decimals, percentages with 1 ---
def _num(x) -> str:
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):  # super activations run to 1e3-1e5: 24,072 reads better than 2.407e+04
        return f"{x:,.0f}" if 1e3 <= abs(x) < 1e9 else f"{x:.4g}"
    return str(x)


def _ppl(x) -> str:
    return DASH if x is None else f"{x:.2f}" if x < 1e5 else f"{x:.2e}"


def _pct(x) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def _tok(s) -> str:
    """A token with its whitespace visible: ' the', '\\n'."""
    return DASH if s is None else repr(s)


def _vis(s) -> str:
    return str(s).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _value(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else _num(v)


# --- reading a run ---
def _load(run_dir: str | Path) -> tuple[Path, dict]:
    run = Path(run_dir)
    path = run / "results.json"
    if not path.is_file():
        raise SuperweightError(f"no results.json in '{run}': not a run directory (see `superweight repair`)")
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SuperweightError(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(r, dict):
        raise SuperweightError(f"'{path}' holds no results object")
    return run, {**r, "patch": _flat_patch(r.get("patch") or {})}


def _flat_patch(p: dict) -> dict:
    """Older runs keyed the patch by row, {"11:507": {norm, ..., "col1229": {...}}}: flatten that one row."""
    if not p or "norm" in p:
        return p
    key, old = next(iter(p.items()))
    layer, _, row = str(key).partition(":")
    flat = {k: v for k, v in old.items() if not k.startswith("col")} | {"layer": layer, "row": row}
    for k, v in old.items():
        if k.startswith("col") and isinstance(v, dict):
            return flat | v | {"col": k[3:]}
    return flat


def _train_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves half a last line; the curve without it is still right
        if isinstance(entry, dict) and "step" in entry and "loss" in entry:
            out.append(entry)
    return out


def _weight(r: dict) -> str | None:
    if (r.get("detect") or {}).get("weight"):
        return str(r["detect"]["weight"])
    broken = str(((r.get("protocol") or {}).get("interventions") or {}).get("broken", ""))
    if broken.startswith("ablate "):
        return broken.removeprefix("ablate ")
    p = r["patch"]
    return f"{p.get('layer')}:{p.get('row')}:{p['col']}" if "col" in p else None


def _conditions(r: dict) -> list[tuple[str, dict, dict]]:
    """(name, metrics, recovery) for base, broken, patched and every baseline present."""
    out = [(n, r[n], (r.get("recovery") or {}) if n == "patched" else {})
           for n in ("base", "broken", "patched") if n in r]
    return out + [(n, m, m.get("recovery") or {}) for n, m in (r.get("baselines") or {}).items()]


def smallest_k(sparsity: list[dict], target: float = 0.9, ranking: str | None = None) -> int | None:
    """The fewest entries whose cut patch recovers `target` of the NLL gap, or None: entries kept by largest |d|
    (the top level of each `sparsity` entry), or by `ranking` ("by_contribution", "random")."""
    for e in sorted(sparsity, key=lambda e: e["k"]):
        scores = (e.get(ranking) or {}) if ranking else e
        if (scores.get("nll_gap") or 0) >= target:
            return e["k"]
    return None


# --- plots: each draws one figure from results (or the train log) and returns it, or None without data ---
def _figure(ncols: int = 1):
    # A bare Figure renders PNGs with Agg without touching pyplot's global backend or figure registry.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _nan(x) -> float:
    return float("nan") if x is None else x


def _plot_loss(r: dict, log: list[dict]):
    if not log:
        return None
    fig, ax = _figure()
    losses = [e["loss"] for e in log]
    ax.plot([e["step"] for e in log], losses, color="tab:blue")
    ax.set(xlabel="step", ylabel="KL loss, nats/token", title="patch training",
           yscale="log" if min(losses) > 0 else "linear")
    return fig


def _plot_ppl_kl(r: dict, log):
    conds = [(n, m) for n, m, _ in _conditions(r) if m.get("ppl") is not None]
    if not conds:
        return None
    fig, (a, b) = _figure(2)
    color = {"base": "tab:green", "broken": "tab:red", "patched": "tab:blue"}
    kl = [(n, m["kl"]) for n, m in conds if n != "base" and (m.get("kl") or 0) > 0]  # log axis: no zeros
    for ax, bars, title in ((a, [(n, m["ppl"]) for n, m in conds], "PPL"), (b, kl, "KL(base || cond.)")):
        names = [n for n, _ in bars]
        ax.bar(names, [v for _, v in bars], color=[color.get(n, "tab:gray") for n in names])
        ax.set(yscale="log", title=title)
        for tick in ax.get_xticklabels():
            tick.set(rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
    return fig


def _plot_sparsity(r: dict, log):
    from matplotlib.ticker import ScalarFormatter

    sp, st = sorted(r.get("sparsity") or [], key=lambda e: e["k"]), r.get("sparse_training") or {}
    if not sp and not st.get("points"):
        return None
    fig, ax = _figure()
    if sp:
        draws = (sp[0].get("random") or {}).get("draws", "?")
        ks = [e["k"] for e in sp]
        ax.plot(ks, [_nan(e.get("nll_gap")) for e in sp], "o-", label="top-k of trained patch")
        if any("by_contribution" in e for e in sp):
            ax.plot(ks, [_nan((e.get("by_contribution") or {}).get("nll_gap")) for e in sp], "D-",
                    color="tab:orange", label="top-k by |x·d| at the massive token")
        ax.plot(ks, [_nan((e.get("random") or {}).get("nll_gap")) for e in sp], "s--", color="tab:gray",
                label=f"random-k (mean of {draws} draws)")
    for method, marker in (("l1", "^"), ("l0", "v")):
        pts = [p for p in st.get("points") or [] if p.get("method") == method and p.get("nnz")]
        if pts:
            ax.scatter([p["nnz"] for p in pts], [p["nll_gap"] for p in pts], marker=marker,
                       label=f"trained {method}")
    front = sorted((p for p in st.get("frontier") or [] if p.get("nnz")), key=lambda p: p["nnz"])
    if front:
        ax.step([p["nnz"] for p in front], [p["nll_gap"] for p in front], where="post", color="tab:purple",
                label="sparse-training frontier")
    ax.axhline(1.0, ls="--", lw=0.8, color="k", label="full recovery")
    ax.axhline(0.9, ls="--", lw=0.8, color="tab:red", label="90%")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 2, 4, ... rather than 2^0, 2^1, ...
    ax.set(xlabel="k non-zero entries in the patch row", ylabel="NLL-gap recovery")
    ax.legend(fontsize=7)
    return fig


def _plot_sweep(r: dict, log):
    sweep = sorted((s for s in r.get("sweep") or [] if s.get("ppl") and s.get("scale") is not None),
                   key=lambda s: s["scale"])
    if not sweep:
        return None
    fig, ax = _figure()
    ax.plot([s["scale"] for s in sweep], [s["ppl"] for s in sweep], "o-")
    ax.set(yscale="log", xlabel="scale of the super weight (1 = unchanged, 0 = ablated)", ylabel="perplexity")
    return fig


PLOTS = {"loss": _plot_loss, "ppl_kl": _plot_ppl_kl, "sparsity": _plot_sparsity, "sweep": _plot_sweep}


def _plots(r: dict, log: list[dict], out: Path) -> dict[str, Path]:
    """Draw every plot the data allows into out/NAME.png; return {NAME: path}."""
    plots = {}
    for name, draw in PLOTS.items():
        fig = draw(r, log)
        if fig is not None:
            plots[name] = write_atomic(out / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return plots


# --- sections: each returns a list of blocks:
# ("h", level, text), ("p", inline), ("table", headers, rows of inline cells), ("img", plot name, alt text),
# where inline text is a str or a list of (text, emphasised) pieces ---
def _table(headers: list[str], rows: list[list]) -> tuple:
    return ("table", headers, [[c if isinstance(c, list) else str(c) for c in row] for row in rows])


def _columns(items: list[dict], spec: list[tuple]) -> tuple:
    """One row per item; spec holds (header, key or function of the item, formatter)."""
    return _table([h for h, _, _ in spec],
                  [[f(k(it) if callable(k) else it.get(k)) for _, k, f in spec] for it in items])


def _kv(d: dict, fmt=_value) -> tuple:
    return _table(["", "value"], [[k, fmt(v)] for k, v in d.items()])


def _img(plots: dict, name: str, alt: str) -> list:
    return [("img", name, alt)] if name in plots else []


def _headline(r: dict, plots) -> list:
    pr, p, rec = r.get("protocol") or {}, r["patch"], r.get("recovery") or {}
    weight, model = _weight(r) or "?", str(pr.get("model", "an unnamed model")).split(" (")[0]
    out = [("h", 1, f"Super weight {weight} in {model}")]
    if "base" in r and "broken" in r:
        text = (f"Zeroing W[{weight}] (layer:row:col of the MLP down-projection) takes PPL from "
                f"{_ppl(r['base'].get('ppl'))} to {_ppl(r['broken'].get('ppl'))}")
        if "patched" in r:
            text += (f"; a row patch of norm {_num(p.get('norm'))} recovers {_pct(rec.get('nll_gap'))} of the "
                     f"NLL gap (PPL {_ppl(r['patched'].get('ppl'))})")
        out.append(("p", text + "."))
    sp = sorted(r.get("sparsity") or [], key=lambda e: e["k"])
    k = smallest_k(sp, ranking="by_contribution")
    if k is not None:
        best = next(e for e in sp if e["k"] == k)
        out.append(("p", f"Of the patch's {sp[-1]['k']} entries, keeping only the {best['k']} with the largest x·d "
                         f"at the massive-activation token recovers {_pct(best['by_contribution']['nll_gap'])}; "
                         f"keeping the {best['k']} largest by magnitude recovers {_pct(best.get('nll_gap'))}."))
    if s90 := (r.get("sparse_training") or {}).get("smallest_90"):
        out.append(("p", f"Trained for sparsity ({s90.get('method')}), a patch of {s90.get('nnz')} non-zero entries "
                         f"recovers {_pct(s90.get('nll_gap'))}."))
    return out


def _summary(r: dict, plots) -> list:
    conds = [{"name": n, **m, "rec": rec} for n, m, rec in _conditions(r)]
    if not conds:
        return []
    pr = r.get("protocol") or {}
    note = (f"{_num(pr.get('n_tokens'))} tokens of {pr.get('corpus', '?')}/{pr.get('split', '?')}. "
            "NLL in nats/token; KL = KL(base || condition) per token; "
            "recovery = share of the broken model's NLL gap (or KL) that a condition closes.")
    return [("h", 2, "Summary"), _columns(conds, [
        ("condition", "name", str), ("NLL", "nll", _num), ("PPL", "ppl", _ppl), ("KL", "kl", _num),
        ("top-1 agree", "top1_agree", _pct), ("super act.", "super_activation", _num),
        ("NLL-gap recovery", lambda c: c["rec"].get("nll_gap"), _pct),
        ("KL recovery", lambda c: c["rec"].get("kl"), _pct)]), ("p", note)]


def _seeds(r: dict, plots) -> list:
    s = r.get("seeds") or {}
    if not s.get("values"):
        return []
    spec = [("seed", "seed", _num), ("NLL-gap recovery", "nll_gap", _pct), ("KL recovery", "kl", _pct),
            ("norm", "norm", _num), ("cos(d, original row)", "cos_original_row", _num)]
    mean, std = s.get("mean") or {}, s.get("std") or {}
    table = _columns(s["values"], spec)
    table[2].append(["mean ± std"] + [f"{f(mean.get(k))} ± {f(std.get(k))}" for _, k, f in spec[1:]])
    return [("h", 2, "Seeds"), ("p", f"{len(s['values'])} patches trained from different seeds; "
                                     "the first is the saved patch."), table]


def _detection(r: dict, plots) -> list:
    d = r.get("detect") or {}
    if not d:
        return []
    return [("h", 2, "Detection"), ("p", f"Chosen weight: {d.get('weight', DASH)}."), _columns(
        d.get("candidates") or [],
        [("layer", "layer", _num), ("row", "row", _num), ("col", "col", _num), ("value", "value", _num),
         ("KL", "kl", _num), ("PPL ratio", "ppl_ratio", _num), ("confirmed", "confirmed", _num),
         ("source", "source", _num)])]


def _training(r: dict, plots) -> list:
    t, out = r.get("training") or {}, _img(plots, "loss", "training loss against step")
    if t:
        line = (f"{_num(t.get('steps'))} steps, {_num(t.get('seconds'))} s "
                f"({_num(t.get('s_per_step'))} s/step), final loss {_num(t.get('final_loss'))}; "
                f"recipe {r.get('recipe', '?')}")
        line += f"; resumed from {t['resumed_from']}" if t.get("resumed_from") else ""
        out.append(("p", line + "."))
    return [("h", 2, "Training")] + out if out else []


def _bars(r: dict, plots) -> list:
    out = _img(plots, "ppl_kl", "PPL and KL by condition")
    return [("h", 2, "Perplexity and KL")] + out if out else []


def _patch(r: dict, plots) -> list:
    p = r["patch"]
    if not p:
        return []
    facts = {"layer, row": f"{p.get('layer')}, {p.get('row')}", "norm ‖d‖": _num(p.get("norm")),
             "cos(d, original row)": _num(p.get("cos_original_row")), "ablated column": _num(p.get("col")),
             "cos(d, e_col)": _num(p.get("cos_ablated_direction")),
             "d[col] vs deleted value": f"{_num(p.get('value_at_col'))} vs {_num(p.get('deleted_value'))}"}
    out = [("h", 2, "The patch"), _kv(facts, str)]
    if len(p.get("cols") or []) > 1:
        out.append(_columns(p["cols"], [("col", "col", _num), ("d[col]", "value_at_col", _num),
                                        ("deleted value", "deleted_value", _num),
                                        ("cos(d, e_col)", "cos_ablated_direction", _num)]))
    if len(p.get("rows") or []) > 1:
        out.append(_columns(p["rows"], [("layer", "layer", _num), ("row", "row", _num), ("norm", "norm", _num),
                                        ("cos(d, original row)", "cos_original_row", _num)]))
    if p.get("top_entries"):
        top = [[n, _num(v)] for n, v in p["top_entries"]]
        out += [("p", "Largest entries of d:"), _table(["neuron", "d[neuron]"], top)]
    return out


def _sparsity(r: dict, plots) -> list:
    sp, st = sorted(r.get("sparsity") or [], key=lambda e: e["k"]), r.get("sparse_training") or {}
    if not sp and not st:
        return []
    out = [("h", 2, "Sparsity")] + _img(plots, "sparsity", "NLL-gap recovery against k non-zero entries")
    if sp:
        rand = lambda key: lambda e: (e.get("random") or {}).get(key)  # noqa: E731
        contrib = lambda key: lambda e: (e.get("by_contribution") or {}).get(key)  # noqa: E731
        out.append(_columns(sp, [("k", "k", _num), ("top-k NLL-gap rec.", "nll_gap", _pct),
                                 ("top-k KL rec.", "kl_recovery", _pct), ("top-k KL", "kl", _num),
                                 ("by-|x·d| NLL-gap rec.", contrib("nll_gap"), _pct),
                                 ("random-k NLL-gap rec.", rand("nll_gap"), _pct),
                                 ("random-k KL", rand("kl"), _num)]))
        k_c = smallest_k(sp, ranking="by_contribution")
        if any("by_contribution" in e for e in sp):
            out.append(("p", "Top-k keeps the largest |d| entries; by-|x·d| keeps the entries that write most at the "
                        "token where the patch writes most (the massive-activation token). Smallest by-|x·d| patch "
                        "recovering >= 90%: " + (f"k = {k_c}." if k_c is not None else "none does.")))
        k = smallest_k(sp)
        out.append(("p", "Smallest top-k patch recovering >= 90% of the NLL gap: "
                    + (f"k = {k} of {sp[-1]['k']}." if k is not None else "none does.")))
        dense = sp[-1].get("nll_gap") or 0
        kr = smallest_k(sp, 0.9 * dense) if dense > 0 else None
        out.append(("p", f"Smallest top-k patch keeping 90% of the full patch's recovery ({_pct(dense)}): "
                    + (f"k = {kr}." if kr is not None else "none.")))
    if st:
        front = {(p.get("method"), p.get("strength")) for p in st.get("frontier") or []}
        out.append(_columns(st.get("points") or [], [
            ("method", "method", _num), ("strength", "strength", _num), ("nnz", "nnz", _num),
            ("PPL", "ppl", _ppl), ("KL", "kl", _num), ("NLL-gap rec.", "nll_gap", _pct),
            ("KL rec.", "kl_recovery", _pct), ("‖d‖", "norm", _num), ("d[col]", "value_at_col", _num),
            ("cos(d, e_col)", "cos_ablated_direction", _num), ("seconds", "seconds", _num),
            ("on frontier", lambda p: (p.get("method"), p.get("strength")) in front, _num)]))
        found = "none does"
        if s := st.get("smallest_90"):
            found = f"nnz = {s['nnz']} ({s.get('method')}, strength {_num(s.get('strength'))})"
        out.append(("p", f"Smallest trained sparse patch recovering >= 90%: {found}."))
    return out


def _sweep(r: dict, plots) -> list:
    if not r.get("sweep"):
        return []
    return [("h", 2, "Scale sweep")] + _img(plots, "sweep", "PPL against scale") + [_columns(
        sorted(r["sweep"], key=lambda s: s.get("scale", 0)),
        [("scale", "scale", _num), ("NLL", "nll", _num), ("PPL", "ppl", _ppl), ("KL", "kl", _num),
         ("top-1 agree", "top1_agree", _pct), ("super act.", "super_activation", _num)])]


def _tokens(r: dict, plots, n: int = 10) -> list:
    t = r.get("tokens") or {}
    if not t:
        return []
    out = [("h", 2, "Tokens")]
    summed = [("token", "token", _tok), ("id", "id", _num), ("count", "count", _num), ("sum", "sum", _num),
              ("mean", "mean", _num)]
    for key, title in (("hurt", "Hurt by the ablation (NLL rise, summed over occurrences)"),
                       ("healed", "Healed by the patch (NLL drop, broken - patched)")):
        out += [("h", 3, title), _columns(t[key][:n], summed)] if t.get(key) else []
    if t.get("rising"):
        out += [("h", 3, "Rising in the broken model (mean predicted probability)"), _columns(t["rising"][:n], [
            ("token", "token", _tok), ("id", "id", _num), ("base", "base_prob", _num),
            ("broken", "broken_prob", _num), ("delta", "delta", _num)])]
    lens = t.get("logit_lens") or {}
    top, bottom = (lens.get("top") or [])[:n], (lens.get("bottom") or [])[:n]
    if top or bottom:
        def cells(es: list, i: int) -> list:
            return [_tok(es[i].get("token")), _num(es[i].get("logit"))] if i < len(es) else ["", ""]
        out += [("h", 3, f"Logit lens of channel {lens.get('row', '?')} after layer {lens.get('layer', '?')}"),
                _table(["+1 promotes", "logit", "-1 promotes", "logit"],
                       [cells(top, i) + cells(bottom, i) for i in range(max(len(top), len(bottom)))])]
    return out


def _neurons(r: dict, plots) -> list:
    out = []
    for nr in r.get("neurons") or []:
        out += [("h", 3, f"Neuron {nr.get('neuron')}: d[n] = {_num(nr.get('value'))}"), _columns(
            nr.get("contexts") or [], [  # analyze writes the text before the token, then the token
                ("context", lambda c: [(_vis(c.get("text", "")), False), (_vis(c.get("token", "")), True)],
                 list),
                ("activation x[n]", "activation", _num), ("contribution x[n]·d[n]", "contribution", _num)])]
    po = r.get("patch_output")
    if po:
        where = f"{_vis(po.get('text', ''))}[{_vis(po.get('token', ''))}]"
        out = [("h", 3, "Where the patch writes"), (
            "p", f"x·d is largest at position {po.get('position')} of its window, token {_tok(po.get('token'))} "
                 f"(context: {where}): {_num(po.get('value'))}, against a median |x·d| of "
                 f"{_num(po.get('median_abs'))} over all tokens; the ablation removed {_num(po.get('removed'))} "
                 "there (x[col] times the deleted weight). The neurons making up that write:"),
            _columns(po.get("top_neurons") or [], [("neuron", "neuron", _num), ("x[n]", "x", _num),
                                                    ("d[n]", "d", _num), ("x[n]·d[n]", "contribution", _num)])] + out
    return [("h", 2, "Neurons the patch listens to")] + out if out else []


def _generations(r: dict, plots) -> list:
    gens = r.get("generations") or []
    cols = list(dict.fromkeys(["prompt"] + [k for g in gens for k in g]))
    return [("h", 2, "Generations"), ("p", "Greedy continuations (newlines shown as \\n)."),
            _table(cols, [[_vis(g.get(c, "")) for c in cols] for g in gens])] if gens else []


def _protocol(r: dict, plots) -> list:
    pr = r.get("protocol") or {}
    keys = ("model", "model_source", "corpus", "split", "n_tokens", "dtype", "device")
    main = {k: pr[k] for k in keys if k in pr}
    if "max_length" in pr:
        main["max_length / stride"] = f"{pr['max_length']} / {pr.get('stride')}"
    out = [_kv(main)] if main else []
    if pr.get("interventions"):
        out.append(_table(["condition", "intervention"], list(map(list, pr["interventions"].items()))))
    if pr.get("provenance"):
        out.append(("p", "Provenance: " + ", ".join(f"{k} {v}" for k, v in pr["provenance"].items()) + "."))
    for title, d in ((f"Recipe {r.get('recipe', '')}".strip(), r.get("config")),
                     ("Analysis protocol", (r.get("analysis") or {}).get("protocol")),
                     ("Sparse-training protocol", (r.get("sparse_training") or {}).get("protocol")),
                     ("Detection protocol", (r.get("detect") or {}).get("protocol")),
                     ("Timings (s)", r.get("timings"))):
        out += [("h", 3, title), _kv(d)] if isinstance(d, dict) and d else []
    return [("h", 2, "Protocol and versions")] + out if out else []


SECTIONS = (_headline, _summary, _seeds, _detection, _training, _bars, _patch, _sparsity, _sweep, _tokens,
            _neurons, _generations, _protocol)


# --- rendering ---
_NUMERIC = re.compile(r"[-+0-9.,e%± –]*[0-9–][-+0-9.,e%± –]*")


def _numeric(cells: list) -> bool:
    cells = [c for c in cells if isinstance(c, str) and c]
    return bool(cells) and all(_NUMERIC.fullmatch(c) for c in cells)


def _md_esc(s: str) -> str:
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")
    return re.sub(r"([\\`*_\[\]|#])", r"\\\1", s)


def _inline(x, esc, bold: str) -> str:
    pieces = [(x, False)] if isinstance(x, str) else x
    return "".join(bold.format(esc(t)) if em and t else esc(t) for t, em in pieces)


def _render_md(blocks: list) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + _md_esc(b[2]))
        elif b[0] == "p":
            out.append(_inline(b[1], _md_esc, "<b>{}</b>"))
        elif b[0] == "img":
            out.append(f"![{b[2]}](plots/{b[1]}.png)")
        else:
            _, headers, rows = b
            num = [_numeric([row[i] for row in rows]) for i in range(len(headers))]
            lines = ["| " + " | ".join(_md_esc(h) for h in headers) + " |",
                     "|" + "|".join("---:" if n else "---" for n in num) + "|"]
            lines += ["| " + " | ".join(_inline(c, _md_esc, "<b>{}</b>") for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _render_html(blocks: list, plots: dict[str, Path]) -> str:
    esc, out = html.escape, []
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{esc(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{_inline(b[1], esc, '<b>{}</b>')}</p>")
        elif b[0] == "img":
            data = base64.b64encode(plots[b[1]].read_bytes()).decode("ascii")
            out.append(f'<p><img alt="{esc(b[2])}" src="data:image/png;base64,{data}"></p>')
        else:
            _, headers, rows = b
            cls = [' class="num"' if _numeric([row[i] for row in rows]) else "" for i in range(len(headers))]
            head = "".join(f"<th{c}>{esc(h)}</th>" for c, h in zip(cls, headers))
            body = "".join("<tr>" + "".join(f"<td{c}>{_inline(x, esc, '<b>{}</b>')}</td>"
                                            for c, x in zip(cls, row)) + "</tr>\n" for row in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>")
    title = esc(blocks[0][2]) if blocks and blocks[0][0] == "h" else "superweight report"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN_DIR/plots/*.png, RUN_DIR/report.md and a self-contained RUN_DIR/report.html.

    Returns (report.md, report.html). Raises SuperweightError when RUN_DIR has no readable results.json."""
    run, r = _load(run_dir)
    plots = _plots(r, _train_log(run / "train_log.jsonl"), run / "plots")
    blocks = [b for section in SECTIONS for b in section(r, plots)]
    md, page = _render_md(blocks), _render_html(blocks, plots)
    return (write_atomic(run / "report.md", lambda tmp: tmp.write_text(md, encoding="utf-8")),
            write_atomic(run / "report.html", lambda tmp: tmp.write_text(page, encoding="utf-8")))


def compare_rows(run_dirs: list[str | Path]) -> list[dict]:
    """One flat dict per run directory, for a table comparing runs (missing values are None)."""
    rows = []
    for run_dir in run_dirs:
        run, r = _load(run_dir)
        rec, p, train = r.get("recovery") or {}, r["patch"], r.get("training") or {}
        smallest = (r.get("sparse_training") or {}).get("smallest_90") or {}
        seeds = r.get("seeds") or {}
        rows.append({
            "run": run.resolve().name, "model": (r.get("protocol") or {}).get("model"), "weight": _weight(r),
            "recipe": r.get("recipe"), "steps": train.get("steps", (r.get("config") or {}).get("steps")),
            "seed": (r.get("config") or {}).get("seed"), "base_ppl": (r.get("base") or {}).get("ppl"),
            "broken_ppl": (r.get("broken") or {}).get("ppl"),
            "patched_ppl": (r.get("patched") or {}).get("ppl"),
            "nll_gap": rec.get("nll_gap"), "kl_recovery": rec.get("kl"), "norm": p.get("norm"),
            "cos_original_row": p.get("cos_original_row"), "value_at_col": p.get("value_at_col"),
            "k90": smallest_k(r.get("sparsity") or []),
            "k90_contribution": smallest_k(r.get("sparsity") or [], ranking="by_contribution"),
            "sparse_nnz90": smallest.get("nnz"),
            "seeds": len(seeds.get("values", [])) or None,
            "seeds_nll_gap_mean": (seeds.get("mean") or {}).get("nll_gap"),
            "seeds_nll_gap_std": (seeds.get("std") or {}).get("nll_gap"),
            "n_tokens": (r.get("protocol") or {}).get("n_tokens"),
            "seconds": train.get("seconds"),
        })
    return rows
