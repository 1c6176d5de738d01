"""The report's sections, in order. Each takes the results and the drawn plots and returns a list of blocks:
("h", level, text), ("p", inline), ("table", headers, rows of inline cells), ("img", plot name, alt text),
where inline text is a str or a list of (text, emphasised) pieces. Sections hold plain text only; the
renderers (render.py) escape it. Each section appears only when its keys exist (docs/results.md).
"""

from __future__ import annotations

from superweight.report.format import DASH, num, pct, ppl, tok, value, vis
from superweight.report.load import conditions, smallest_k, weight_of


def _table(headers: list[str], rows: list[list]) -> tuple:
    return ("table", headers, [[c if isinstance(c, list) else str(c) for c in row] for row in rows])


def _columns(items: list[dict], spec: list[tuple]) -> tuple:
    """One row per item; spec holds (header, key or function of the item, formatter)."""
    return _table([h for h, _, _ in spec],
                  [[f(k(it) if callable(k) else it.get(k)) for _, k, f in spec] for it in items])


def _kv(d: dict, fmt=value) -> tuple:
    return _table(["", "value"], [[k, fmt(v)] for k, v in d.items()])


def _img(plots: dict, name: str, alt: str) -> list:
    return [("img", name, alt)] if name in plots else []


def _headline(r: dict, plots) -> list:
    pr, p, rec = r.get("protocol") or {}, r["patch"], r.get("recovery") or {}
    weight, model = weight_of(r) or "?", str(pr.get("model", "an unnamed model")).split(" (")[0]
    out = [("h", 1, f"Super weight {weight} in {model}")]
    if "base" in r and "broken" in r:
        text = (f"Zeroing W[{weight}] (layer:row:col of the MLP down-projection) takes PPL from "
                f"{ppl(r['base'].get('ppl'))} to {ppl(r['broken'].get('ppl'))}")
        if "patched" in r:
            text += (f"; a row patch of norm {num(p.get('norm'))} recovers {pct(rec.get('nll_gap'))} of the "
                     f"NLL gap (PPL {ppl(r['patched'].get('ppl'))})")
        out.append(("p", text + "."))
    sp = sorted(r.get("sparsity") or [], key=lambda e: e["k"])
    k = smallest_k(sp, ranking="by_contribution")
    if k is not None:
        best = next(e for e in sp if e["k"] == k)
        out.append(("p", f"Of the patch's {sp[-1]['k']} entries, keeping only the {best['k']} with the largest x·d "
                         f"at the massive-activation token recovers {pct(best['by_contribution']['nll_gap'])}; "
                         f"keeping the {best['k']} largest by magnitude recovers {pct(best.get('nll_gap'))}."))
    if s90 := (r.get("sparse_training") or {}).get("smallest_90"):
        out.append(("p", f"Trained for sparsity ({s90.get('method')}), a patch of {s90.get('nnz')} non-zero entries "
                         f"recovers {pct(s90.get('nll_gap'))}."))
    return out


def _summary(r: dict, plots) -> list:
    conds = [{"name": n, **m, "rec": rec} for n, m, rec in conditions(r)]
    if not conds:
        return []
    pr = r.get("protocol") or {}
    note = (f"{num(pr.get('n_tokens'))} tokens of {pr.get('corpus', '?')}/{pr.get('split', '?')}. "
            "NLL in nats/token; KL = KL(base || condition) per token; "
            "recovery = share of the broken model's NLL gap (or KL) that a condition closes.")
    return [("h", 2, "Summary"), _columns(conds, [
        ("condition", "name", str), ("NLL", "nll", num), ("PPL", "ppl", ppl), ("KL", "kl", num),
        ("top-1 agree", "top1_agree", pct), ("super act.", "super_activation", num),
        ("NLL-gap recovery", lambda c: c["rec"].get("nll_gap"), pct),
        ("KL recovery", lambda c: c["rec"].get("kl"), pct)]), ("p", note)]


def _seeds(r: dict, plots) -> list:
    s = r.get("seeds") or {}
    if not s.get("values"):
        return []
    spec = [("seed", "seed", num), ("NLL-gap recovery", "nll_gap", pct), ("KL recovery", "kl", pct),
            ("norm", "norm", num), ("cos(d, original row)", "cos_original_row", num)]
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
        [("layer", "layer", num), ("row", "row", num), ("col", "col", num), ("value", "value", num),
         ("KL", "kl", num), ("PPL ratio", "ppl_ratio", num), ("confirmed", "confirmed", num),
         ("source", "source", num)])]


def _training(r: dict, plots) -> list:
    t, out = r.get("training") or {}, _img(plots, "loss", "training loss against step")
    if t:
        line = (f"{num(t.get('steps'))} steps, {num(t.get('seconds'))} s "
                f"({num(t.get('s_per_step'))} s/step), final loss {num(t.get('final_loss'))}; "
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
    facts = {"layer, row": f"{p.get('layer')}, {p.get('row')}", "norm ‖d‖": num(p.get("norm")),
             "cos(d, original row)": num(p.get("cos_original_row")), "ablated column": num(p.get("col")),
             "cos(d, e_col)": num(p.get("cos_ablated_direction")),
             "d[col] vs deleted value": f"{num(p.get('value_at_col'))} vs {num(p.get('deleted_value'))}"}
    out = [("h", 2, "The patch"), _kv(facts, str)]
    if len(p.get("cols") or []) > 1:
        out.append(_columns(p["cols"], [("col", "col", num), ("d[col]", "value_at_col", num),
                                        ("deleted value", "deleted_value", num),
                                        ("cos(d, e_col)", "cos_ablated_direction", num)]))
    if len(p.get("rows") or []) > 1:
        out.append(_columns(p["rows"], [("layer", "layer", num), ("row", "row", num), ("norm", "norm", num),
                                        ("cos(d, original row)", "cos_original_row", num)]))
    if p.get("top_entries"):
        top = [[n, num(v)] for n, v in p["top_entries"]]
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
        out.append(_columns(sp, [("k", "k", num), ("top-k NLL-gap rec.", "nll_gap", pct),
                                 ("top-k KL rec.", "kl_recovery", pct), ("top-k KL", "kl", num),
                                 ("by-|x·d| NLL-gap rec.", contrib("nll_gap"), pct),
                                 ("random-k NLL-gap rec.", rand("nll_gap"), pct),
                                 ("random-k KL", rand("kl"), num)]))
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
        out.append(("p", f"Smallest top-k patch keeping 90% of the full patch's recovery ({pct(dense)}): "
                    + (f"k = {kr}." if kr is not None else "none.")))
    if st:
        front = {(p.get("method"), p.get("strength")) for p in st.get("frontier") or []}
        out.append(_columns(st.get("points") or [], [
            ("method", "method", num), ("strength", "strength", num), ("nnz", "nnz", num),
            ("PPL", "ppl", ppl), ("KL", "kl", num), ("NLL-gap rec.", "nll_gap", pct),
            ("KL rec.", "kl_recovery", pct), ("‖d‖", "norm", num), ("d[col]", "value_at_col", num),
            ("cos(d, e_col)", "cos_ablated_direction", num), ("seconds", "seconds", num),
            ("on frontier", lambda p: (p.get("method"), p.get("strength")) in front, num)]))
        found = "none does"
        if s := st.get("smallest_90"):
            found = f"nnz = {s['nnz']} ({s.get('method')}, strength {num(s.get('strength'))})"
        out.append(("p", f"Smallest trained sparse patch recovering >= 90%: {found}."))
    return out


def _sweep(r: dict, plots) -> list:
    if not r.get("sweep"):
        return []
    return [("h", 2, "Scale sweep")] + _img(plots, "sweep", "PPL against scale") + [_columns(
        sorted(r["sweep"], key=lambda s: s.get("scale", 0)),
        [("scale", "scale", num), ("NLL", "nll", num), ("PPL", "ppl", ppl), ("KL", "kl", num),
         ("top-1 agree", "top1_agree", pct), ("super act.", "super_activation", num)])]


def _tokens(r: dict, plots, n: int = 10) -> list:
    t = r.get("tokens") or {}
    if not t:
        return []
    out = [("h", 2, "Tokens")]
    summed = [("token", "token", tok), ("id", "id", num), ("count", "count", num), ("sum", "sum", num),
              ("mean", "mean", num)]
    for key, title in (("hurt", "Hurt by the ablation (NLL rise, summed over occurrences)"),
                       ("healed", "Healed by the patch (NLL drop, broken - patched)")):
        out += [("h", 3, title), _columns(t[key][:n], summed)] if t.get(key) else []
    if t.get("rising"):
        out += [("h", 3, "Rising in the broken model (mean predicted probability)"), _columns(t["rising"][:n], [
            ("token", "token", tok), ("id", "id", num), ("base", "base_prob", num),
            ("broken", "broken_prob", num), ("delta", "delta", num)])]
    lens = t.get("logit_lens") or {}
    top, bottom = (lens.get("top") or [])[:n], (lens.get("bottom") or [])[:n]
    if top or bottom:
        def cells(es: list, i: int) -> list:
            return [tok(es[i].get("token")), num(es[i].get("logit"))] if i < len(es) else ["", ""]
        out += [("h", 3, f"Logit lens of channel {lens.get('row', '?')} after layer {lens.get('layer', '?')}"),
                _table(["+1 promotes", "logit", "-1 promotes", "logit"],
                       [cells(top, i) + cells(bottom, i) for i in range(max(len(top), len(bottom)))])]
    return out


def _neurons(r: dict, plots) -> list:
    out = []
    for nr in r.get("neurons") or []:
        out += [("h", 3, f"Neuron {nr.get('neuron')}: d[n] = {num(nr.get('value'))}"), _columns(
            nr.get("contexts") or [], [  # analyze writes the text before the token, then the token
                ("context", lambda c: [(vis(c.get("text", "")), False), (vis(c.get("token", "")), True)],
                 list),
                ("activation x[n]", "activation", num), ("contribution x[n]·d[n]", "contribution", num)])]
    po = r.get("patch_output")
    if po:
        where = f"{vis(po.get('text', ''))}[{vis(po.get('token', ''))}]"
        out = [("h", 3, "Where the patch writes"), (
            "p", f"x·d is largest at position {po.get('position')} of its window, token {tok(po.get('token'))} "
                 f"(context: {where}): {num(po.get('value'))}, against a median |x·d| of "
                 f"{num(po.get('median_abs'))} over all tokens; the ablation removed {num(po.get('removed'))} "
                 "there (x[col] times the deleted weight). The neurons making up that write:"),
            _columns(po.get("top_neurons") or [], [("neuron", "neuron", num), ("x[n]", "x", num),
                                                    ("d[n]", "d", num), ("x[n]·d[n]", "contribution", num)])] + out
    return [("h", 2, "Neurons the patch listens to")] + out if out else []


def _generations(r: dict, plots) -> list:
    gens = r.get("generations") or []
    cols = list(dict.fromkeys(["prompt"] + [k for g in gens for k in g]))
    return [("h", 2, "Generations"), ("p", "Greedy continuations (newlines shown as \\n)."),
            _table(cols, [[vis(g.get(c, "")) for c in cols] for g in gens])] if gens else []


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
