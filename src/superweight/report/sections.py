"""The report's sections, in order. Each takes the run record and the drawn plots and returns a list of blocks:
("h", level, text), ("p", inline), ("table", headers, rows of inline cells), ("img", plot name, alt text),
where inline text is a str or a list of (text, emphasised) pieces. Sections hold plain text only; the
renderers (render.py) escape it. Each section appears only when its stage has run (docs/results.md).
"""

from __future__ import annotations

from superweight.schema.record import RunRecord, smallest_k
from superweight.measure.grade import GRADES, grade_words
from superweight.report.compensation import compensation_section, regime_sentences
from superweight.report.format import DASH, NO_DAMAGE, interval, num, pct, ppl, rec, tok, value, vis


def _table(headers: list[str], rows: list[list]) -> tuple:
    return ("table", headers, [[c if isinstance(c, list) else str(c) for c in row] for row in rows])


def _columns(items: list, spec: list[tuple]) -> tuple:
    """One row per item; spec holds (header, attribute name or function of the item, formatter)."""
    return _table([h for h, _, _ in spec],
                  [[f(k(it) if callable(k) else getattr(it, k)) for _, k, f in spec] for it in items])


def _kv(d: dict, fmt=value) -> tuple:
    return _table(["", "value"], [[k, fmt(v)] for k, v in d.items()])


def _img(plots: dict, name: str, alt: str) -> list:
    return [("img", name, alt)] if name in plots else []


def _headline(r: RunRecord, plots) -> list:
    p, model = r.patch, r.protocol.model.split(" (")[0]
    grade = r.detect.grade if r.detect else None
    title = {"super weight": "Super weight", "sensitive weight": "Sensitive weight (not a super weight)",
             "none": "Weight (not a super weight)"}.get(grade, "Ablated weight")
    size = (f"writing {num(p.write_vs_removed)}x what the ablation removed (RMS over tokens)"
            if p.write_vs_removed is not None else
            f"writing {num(p.write_rms)} RMS into the row" if p.write_rms is not None else f"of norm {num(p.norm)}")
    out = [("h", 1, f"{title} {r.weight} in {model}"), (
        "p", f"Zeroing W[{r.weight}] (layer:row:col of the MLP down-projection) takes PPL from {ppl(r.base.ppl)} "
             f"to {ppl(r.broken.ppl)}; a row patch {size} " + (
                 f"recovers {pct(r.recovery.nll_gap)} of the NLL gap" if r.recovery.nll_gap is not None else
                 f"leaves PPL at {ppl(r.patched.ppl)}: recovery {NO_DAMAGE}") + f" (PPL {ppl(r.patched.ppl)}).")]
    if r.verdict == "failed":
        out.append(("p", "Verdict: failed. The patched model is no better than the broken one on the eval tokens; "
                         "do not use this patch."))
    elif r.verdict == "nothing to repair":
        out.append(("p", "Verdict: nothing to repair. Zeroing the weight did no measurable damage on the eval tokens."))
    elif r.verdict:
        out.append(("p", f"Verdict: {r.verdict} (repaired: NLL-gap and KL recovery both at least 90%)."))
    out += [("p", line) for line in regime_sentences(r)]
    if grade:
        out.append(("p", f"Detection grades it {grade_words(grade)}: {GRADES[grade]}."))
    sp = sorted(r.sparsity or [], key=lambda e: e.k)
    k = smallest_k(sp, ranking="by_contribution")
    if k is not None:
        best = next(e for e in sp if e.k == k)
        out.append(("p", f"Of the patch's {sp[-1].k} entries, keeping only the {best.k} with the largest x·d "
                         f"at the massive-activation token recovers {pct(best.by_contribution.nll_gap)}; "
                         f"keeping the {best.k} largest by magnitude recovers {pct(best.nll_gap)}."))
    if r.sparse_training and (s90 := r.sparse_training.smallest_90):
        out.append(("p", f"Trained for sparsity ({s90.method}), a patch of {s90.nnz} non-zero entries "
                         f"recovers {pct(s90.nll_gap)}."))
    out += [("p", line) for line in sink_sentences(r)]
    return out


def _sink_tokens(sk) -> str:
    """'position 0', 'position 0, and others in 3 of 8 windows', or 'a position that varies by window'."""
    sets = [set(p) for p in sk.positions]
    common = set.intersection(*sets) if sets else set()
    more = sum(bool(p - common) for p in sets)
    where = f"position {', '.join(map(str, sorted(common)))}" if common else "a position that varies by window"
    return where + (f", and others in {more} of {len(sets)} windows" if common and more else "")


def largest_sink_change(sk):
    """The layer whose mean sink mass the ablation changes most (broken - base), or None."""
    return max(sk.layers, key=lambda e: abs(e.conditions["broken"].sink_mass - e.conditions["base"].sink_mass),
               default=None)


def sink_sentences(r: RunRecord) -> list[str]:
    """The headline's two sentences on the mechanism: where the sink breaks, and whether the patch restores it."""
    sk = r.sinks
    if not sk or not sk.layers or "broken" not in sk.layers[0].conditions:
        return []
    tokens = _sink_tokens(sk)
    big = largest_sink_change(sk)
    b = big.conditions
    if sk.breaks_at is not None:
        c = sk.layers[sk.breaks_at].conditions
        also = ("" if big.layer == sk.breaks_at else f"; its largest change is at layer {big.layer}, from "
                f"{b['base'].sink_mass:.2f} to {b['broken'].sink_mass:.2f}")
        first = (f"Mechanism: with the weight zeroed, the attention sink (sink tokens: {tokens}) "
                 f"breaks at layer {sk.breaks_at}: the heads' mean attention mass on it falls from "
                 f"{c['base'].sink_mass:.2f} to {c['broken'].sink_mass:.2f}, and the share of heads with a sink "
                 f"(mass > {sk.threshold:g}) from {pct(c['base'].sink_heads)} to {pct(c['broken'].sink_heads)}"
                 f"{also}.")
    else:
        first = (f"Mechanism: zeroing the weight does not break the attention sink (sink tokens: {tokens}): no "
                 f"layer's mean sink mass falls below {1 - sk.break_drop:g}x the intact model's; it changes most at "
                 f"layer {big.layer}, from {b['base'].sink_mass:.2f} to {b['broken'].sink_mass:.2f}.")
    if "patched" not in sk.layers[0].conditions:
        return [first]
    undone = [e.entropy_undone for e in sk.layers if e.entropy_undone is not None]
    ent = (f"; it undoes {pct(sum(undone) / len(undone))} of the attention-entropy change, mean over the "
           f"{len(undone)} layers the ablation changes" if undone else "")
    if sk.breaks_at is None:
        second = f"The patch leaves the sink as it was{ent}."
    else:
        c = sk.layers[sk.breaks_at].conditions
        verb = ("restores it" if sk.restored is not None and sk.restored >= 0.9 else
                "partly restores it" if sk.restored is not None and sk.restored >= 0.5 else
                "does not restore it: it reaches the loss another way")
        second = (f"The patch {verb}: from layer {sk.breaks_at} on it gives back {pct(sk.restored)} of the lost "
                  f"sink mass (layer {sk.breaks_at}: {c['patched'].sink_mass:.2f}){ent}.")
    return [first, second]


def _summary(r: RunRecord, plots) -> list:
    pr = r.protocol
    note = (f"{num(pr.n_tokens)} tokens of {pr.corpus}/{pr.split}. "
            "NLL in nats/token; KL = KL(base || condition) per token; "
            "recovery = share of the broken model's NLL gap (or KL) that a condition closes.")
    return [("h", 2, "Summary"), _columns(r.conditions(), [
        ("condition", lambda c: c[0], str), ("NLL", lambda c: c[1].nll, num), ("PPL", lambda c: c[1].ppl, ppl),
        ("KL", lambda c: c[1].kl, num), ("top-1 agree", lambda c: c[1].top1_agree, pct),
        ("super act.", lambda c: c[1].super_activation, num),
        ("NLL-gap recovery", lambda c: rec(c[2].nll_gap) if c[2] else DASH, str),
        ("95% interval", lambda c: getattr(c[1], "interval", None), interval),
        ("KL recovery", lambda c: rec(c[2].kl) if c[2] else DASH, str)]), ("p", note + _subset_note(r))]


def _subset_note(r: RunRecord) -> str:
    sizes = {b.n_tokens for b in (r.baselines or {}).values()} - {r.protocol.n_tokens}
    return (f" Baselines are scored on the first {num(min(sizes))} tokens, their recoveries against base and broken "
            "over the same tokens (interval: block bootstrap)." if sizes else "")


def _tasks(r: RunRecord, plots) -> list:
    t = r.tasks
    if not t:
        return []
    conds = list(t.scores)
    rows = []
    for task, metrics in t.scores.get("base", {}).items():
        for metric in metrics:
            cells = [t.scores[c].get(task, {}).get(metric) for c in conds]
            rows.append([task, metric] + ["-" if sc is None else f"{sc.value:.3f}" + (
                f" ± {sc.stderr:.3f}" if sc.stderr is not None else "") for sc in cells])
    items = ", ".join(f"{k}: {v.get('samples')} items, {v.get('n_shot')}-shot" for k, v in t.tasks.items())
    return [("h", 2, "Zero-shot tasks"), _table(["task", "metric"] + conds, rows),
            ("p", f"lm-evaluation-harness {t.harness} on the same model per condition ({items}); "
                  "value ± the harness's standard error.")]


def _seeds(r: RunRecord, plots) -> list:
    s = r.seeds
    if not s or not s.values:
        return []
    spec = [("seed", "seed", num), ("NLL-gap recovery", "nll_gap", rec), ("KL recovery", "kl", rec),
            ("norm", "norm", num), ("cos(d, original row)", "cos_original_row", num)]
    table = _columns(s.values, spec)
    table[2].append(["mean ± std"] + [f"{f(getattr(s.mean, k))} ± {f(getattr(s.std, k))}" for _, k, f in spec[1:]])
    return [("h", 2, "Seeds"), ("p", f"{len(s.values)} patches trained from different seeds; "
                                     "the first is the saved patch."), table]


def _detection(r: RunRecord, plots) -> list:
    d = r.detect
    if not d:
        return []
    grades = "; ".join(f"{k}: {v}" for k, v in GRADES.items())
    spec = [("layer", "layer", num), ("row", "row", num), ("col", "col", num), ("value", "value", num),
            ("KL", "kl", num), ("PPL ratio", "ppl_ratio", num), ("confirmed", "confirmed", num),
            ("grade", lambda c: c.grade or "-", str), ("source", "source", num)]
    if any(c.expert is not None for c in d.candidates):  # a mixture of experts (stages/experts.py)
        spec[1:1] = [("expert", "expert", num)]
        spec += [("router picks it at massive tokens", "expert_picked", pct),
                 ("at all tokens", "expert_picked_all", pct), ("KL, expert pruned", "expert_kl", num),
                 ("expert grade", lambda c: c.expert_grade or "-", str)]
    return [("h", 2, "Detection"), ("p", f"Chosen weight: {d.weight}, {grade_words(d.grade)}."),
            _columns(d.candidates, spec), ("p", f"Grades: {grades}.")]


def _training(r: RunRecord, plots) -> list:
    t = r.training
    line = (f"{num(t.steps)} steps, {num(t.seconds)} s ({num(t.s_per_step)} s/step), final loss "
            f"{num(t.final_loss)}; recipe {r.recipe}")
    line += f"; resumed from {t.resumed_from}" if t.resumed_from else ""
    return [("h", 2, "Training"), *_img(plots, "loss", "training loss against step"), ("p", line + ".")]


def _bars(r: RunRecord, plots) -> list:
    out = _img(plots, "ppl_kl", "PPL and KL by condition")
    return [("h", 2, "Perplexity and KL")] + out if out else []


def _patch(r: RunRecord, plots) -> list:
    p = r.patch
    facts = {"layer, row": f"{p.layer}, {p.row}", "ablated column": num(p.col),
             "write / removed: RMS(x·d) / RMS(x[col]·deleted) (invariant to every rescaling)": num(p.write_vs_removed),
             "RMS write x·d (invariant to neuron rescaling; scales with the residual stream)": num(p.write_rms),
             "cos(x·d, x·w_row) (invariant)": num(p.write_cos_original_row),
             "cos(x·d, x[col]) (invariant)": num(p.write_cos_ablated),
             "d[col] / deleted value (invariant)": num(p.value_ratio),
             "‖d‖ balanced (invariant)": num(p.balanced_norm),
             "norm ‖d‖": num(p.norm), "cos(d, original row)": num(p.cos_original_row),
             "cos(d, e_col)": num(p.cos_ablated_direction),
             "d[col] vs deleted value": f"{num(p.value_at_col)} vs {num(p.deleted_value)}"}
    out = [("h", 2, "The patch"), _kv(facts, str), (
        "p", "Invariant: unchanged when a neuron's input is scaled by a and its down-projection column by 1/a, "
             "which leaves the model's function as it is (superweight.core.reparam). x·d is what the patch "
             "writes into the row at each eval token; the balanced norm is ‖d‖ after rescaling every neuron to "
             "equal in and out weight norms. ‖d‖, cos(d, ·) and the |d| ranking depend on the "
             "parametrization.")]
    if len(p.cols) > 1:
        out.append(_columns(p.cols, [("col", "col", num), ("d[col]", "value_at_col", num),
                                     ("deleted value", "deleted_value", num),
                                     ("cos(d, e_col)", "cos_ablated_direction", num)]))
    if len(p.rows) > 1:
        out.append(_columns(p.rows, [("layer", "layer", num), ("row", "row", num), ("norm", "norm", num),
                                     ("cos(d, original row)", "cos_original_row", num)]))
    if p.top_writes:
        top = [[n, num(v)] for n, v in p.top_writes]
        out += [("p", "Entries that write most (RMS of x_j·d_j over tokens, invariant):"),
                _table(["neuron", "RMS x_j·d_j"], top)]
    if p.top_entries:
        top = [[n, num(v)] for n, v in p.top_entries]
        out += [("p", "Largest entries of d (parametrization-dependent):"), _table(["neuron", "d[neuron]"], top)]
    return out


def _sparsity(r: RunRecord, plots) -> list:
    sp, st = sorted(r.sparsity or [], key=lambda e: e.k), r.sparse_training
    if not sp and not st:
        return []
    out = [("h", 2, "Sparsity")] + _img(plots, "sparsity", "NLL-gap recovery against k non-zero entries")
    if sp:
        out.append(_columns(sp, [("k", "k", num), ("top-k NLL-gap rec.", "nll_gap", rec),
                                 ("top-k KL rec.", "kl_recovery", rec), ("top-k KL", "kl", num),
                                 ("by-|x·d| NLL-gap rec.", lambda e: e.by_contribution.nll_gap, rec),
                                 ("random-k NLL-gap rec.", lambda e: rec(e.random.nll_gap) if e.random else DASH, str),
                                 ("random-k KL", lambda e: e.random and e.random.kl, num)]))
        if r.analysis and r.analysis.subset_tokens:
            out.append(("p", f"Random-k draws are scored on the first {r.analysis.subset_tokens:,} eval tokens, "
                             "against base and broken over the same tokens."))
        k_c = smallest_k(sp, ranking="by_contribution")
        out.append(("p", "Top-k keeps the largest |d| entries (parametrization-dependent); by-|x·d| keeps the "
                    "entries that write most at the token where the patch writes most (the massive-activation "
                    "token; invariant). Smallest by-|x·d| patch "
                    "recovering >= 90%: " + (f"k = {k_c}." if k_c is not None else "none does.")))
        k = smallest_k(sp)
        out.append(("p", "Smallest top-k patch recovering >= 90% of the NLL gap: "
                    + (f"k = {k} of {sp[-1].k}." if k is not None else "none does.")))
        dense = sp[-1].nll_gap
        kr = smallest_k(sp, 0.9 * dense) if dense is not None and dense > 0 else None
        out.append(("p", f"Smallest top-k patch keeping 90% of the full patch's recovery ({rec(dense)}): "
                    + (f"k = {kr}." if kr is not None else "none.") + (f" Recovery {NO_DAMAGE}." if dense is None else "")))
    if st:
        front = {(p.method, p.strength) for p in st.frontier}
        out.append(_columns(st.points, [
            ("method", "method", num), ("strength", "strength", num), ("nnz", "nnz", num),
            ("PPL", "ppl", ppl), ("KL", "kl", num), ("NLL-gap rec.", "nll_gap", rec),
            ("KL rec.", "kl_recovery", rec), ("‖d‖", "norm", num), ("d[col]", "value_at_col", num),
            ("cos(d, e_col)", "cos_ablated_direction", num), ("seconds", "seconds", num),
            ("on frontier", lambda p: (p.method, p.strength) in front, num)]))
        s = st.smallest_90
        found = f"nnz = {s.nnz} ({s.method}, strength {num(s.strength)})" if s else "none does"
        out.append(("p", f"Smallest trained sparse patch recovering >= 90%: {found}."))
    return out


def _sweep(r: RunRecord, plots) -> list:
    if not r.sweep:
        return []
    n = r.sweep[0].metrics.n_tokens
    return [("h", 2, "Scale sweep"), ("p", f"Every scale, base included, on the same {n:,} eval tokens.")] + _img(
        plots, "sweep", "PPL against scale") + [_columns(
        sorted(r.sweep, key=lambda s: s.scale),
        [("scale", "scale", num), ("NLL", lambda s: s.metrics.nll, num), ("PPL", lambda s: s.metrics.ppl, ppl),
         ("KL", lambda s: s.metrics.kl, num), ("top-1 agree", lambda s: s.metrics.top1_agree, pct),
         ("super act.", lambda s: s.metrics.super_activation, num)])]


def _sinks(r: RunRecord, plots) -> list:
    sk = r.sinks
    if not sk or not sk.layers:
        return []
    conds = list(sk.layers[0].conditions)

    def cells(e, field, fmt):
        return [fmt(getattr(e.conditions[c], field)) for c in conds]

    mass = lambda x: f"{x:.3f}"  # noqa: E731
    rows = [[e.layer] + cells(e, "sink_mass", mass) + cells(e, "sink_heads", pct) + cells(e, "norm_massive", num)
            + [num(e.conditions["base"].norm_typical), pct(e.entropy_undone)] for e in sk.layers]
    headers = (["layer"] + [f"sink mass {c}" for c in conds] + [f"heads with sink {c}" for c in conds]
               + [f"‖h‖ massive {c}" for c in conds] + ["‖h‖ typical base", "entropy change undone"])
    big = largest_sink_change(sk)
    note = (f"Sink tokens: where |residual channel {sk.channel}| reaches {sk.massive_fraction:g}x its window maximum "
            f"in the intact model (here: {_sink_tokens(sk)}){', and the BOS' if r.protocol.bos is not None else ''}; "
            f"{sk.windows} windows of {sk.window} tokens. Sink mass: a head's attention on the sink tokens, mean "
            "over the queries after the first sink; the table gives the mean over heads (± spread in the figure) "
            f"and the share of heads whose mass exceeds {sk.threshold:g}. ‖h‖: the residual-stream norm after the "
            "block at the massive-activation token, and the median over the other tokens (typical). Entropy change "
            "undone: 1 - Σ_h|H_patched - H_base| / Σ_h|H_broken - H_base| over heads. The sink breaks where the "
            f"broken sink mass falls below {1 - sk.break_drop:g}x the base's"
            + (f"; the largest change is at layer {big.layer}." if big else "."))
    return [("h", 2, "Attention sinks: how the damage travels")] + _img(
        plots, "sinks", "attention mass on the sink token per layer: base, broken, patched") + [
        ("p", note), _table(headers, rows)]


def _tokens(r: RunRecord, plots, n: int = 10) -> list:
    t = r.tokens
    if not t:
        return []
    out = [("h", 2, "Tokens")]
    summed = [("token", "token", tok), ("id", "id", num), ("count", "count", num), ("sum", "sum", num),
              ("mean", "mean", num)]
    for rows, title in ((t.hurt, "Hurt by the ablation (NLL rise, summed over occurrences)"),
                        (t.healed, "Healed by the patch (NLL drop, broken - patched)")):
        out += [("h", 3, title), _columns(rows[:n], summed)] if rows else []
    if t.rising:
        out += [("h", 3, "Rising in the broken model (mean predicted probability)"), _columns(t.rising[:n], [
            ("token", "token", tok), ("id", "id", num), ("base", "base_prob", num),
            ("broken", "broken_prob", num), ("delta", "delta", num)])]
    lens = t.logit_lens
    top, bottom = lens.top[:n], lens.bottom[:n]
    if top or bottom:
        def cells(es: list, i: int) -> list:
            return [tok(es[i].token), num(es[i].logit)] if i < len(es) else ["", ""]
        out += [("h", 3, f"Logit lens of channel {lens.row} after layer {lens.layer}"),
                _table(["+1 promotes", "logit", "-1 promotes", "logit"],
                       [cells(top, i) + cells(bottom, i) for i in range(max(len(top), len(bottom)))])]
    return out


def _neurons(r: RunRecord, plots) -> list:
    out = []
    for nr in r.neurons or []:
        out += [("h", 3, f"Neuron {nr.neuron}: d[n] = {num(nr.value)}"), _columns(
            nr.contexts, [  # analyze writes the text before the token, then the token
                ("context", lambda c: [(vis(c.text), False), (vis(c.token), True)], list),
                ("activation x[n]", "activation", num), ("contribution x[n]·d[n]", "contribution", num)])]
    if po := r.patch_output:
        out = [("h", 3, "Where the patch writes"), (
            "p", f"x·d is largest at position {po.position} of its window, token {tok(po.token)} "
                 f"(context: {vis(po.text)}[{vis(po.token)}]): {num(po.value)}, against a median |x·d| of "
                 f"{num(po.median_abs)} over all tokens; the ablation removed {num(po.removed)} "
                 "there (x[col] times the deleted weight). The neurons making up that write:"),
            _columns(po.top_neurons, [("neuron", "neuron", num), ("x[n]", "x", num),
                                      ("d[n]", "d", num), ("x[n]·d[n]", "contribution", num)])] + out
    return [("h", 2, "Neurons the patch listens to")] + out if out else []


def _generations(r: RunRecord, plots) -> list:
    gens = r.generations
    cols = list(dict.fromkeys(["prompt"] + [k for g in gens for k in g]))
    return [("h", 2, "Generations"), ("p", "Greedy continuations (newlines shown as \\n)."),
            _table(cols, [[vis(g.get(c, "")) for c in cols] for g in gens])] if gens else []


def _cost(r: RunRecord) -> dict | None:
    c = r.cost
    return c and {**{k: round(s.forward + s.backward, 2) for k, s in c.stages.items()}, "total": round(c.total, 2)}


def _protocol(r: RunRecord, plots) -> list:
    pr = r.protocol
    main = pr.model_dump(include={"model", "model_source", "corpus", "split", "n_tokens", "dtype", "device"})
    main["max_length / stride"] = f"{pr.max_length} / {pr.stride}"
    if pr.bos is not None:
        main["BOS token (first in every window)"] = pr.bos
    out = [_kv(main)]
    if pr.interventions:
        out.append(_table(["condition", "intervention"], list(map(list, pr.interventions.items()))))
    if pr.provenance:
        out.append(("p", "Provenance: " + ", ".join(f"{k} {v}" for k, v in pr.provenance.items()) + "."))
    for title, part in ((f"Recipe {r.recipe}", r.config), ("Analysis protocol", r.analysis and r.analysis.protocol),
                        ("Sparse-training protocol", r.sparse_training and r.sparse_training.protocol),
                        ("Detection protocol", r.detect and r.detect.protocol), ("Timings (s)", r.timings),
                        ("Model work (eval-pass equivalents, forward + backward)", _cost(r))):
        d = part if isinstance(part, dict) or part is None else part.model_dump()
        out += [("h", 3, title), _kv(d)] if d else []
    return [("h", 2, "Protocol and versions")] + out


def quantize_section(q, plots) -> list:
    """`run --quantize` (schema/quantize.QuantResult): the table, the figure and what changed the super weight."""
    rows = [[x.name, ppl(x.ppl), num(x.kl), pct(x.top1_agree), pct(x.recovery.nll_gap) if x.recovery else "-",
             f"{x.n_clipped:,}", str(x.n_kept), f"{x.effective_bits:.3f}"] for x in q.rows + q.patched_rows]
    rows += [[a.name, ppl(a.ppl), num(a.kl), pct(a.top1_agree), pct(a.recovery.nll_gap) if a.recovery else "-",
              "-", "-", "-"] for a in q.activations]
    return [("h", 2, "Quantization"),
            ("p", f"Round-to-nearest fake quantization of every decoder linear weight; fp PPL {ppl(q.base.ppl)} on "
                  f"{q.base.n_tokens:,} tokens; super weights {', '.join(q.keep) or 'none'} ({q.keep_source}). "
                  "Recovery is against plain RTN at the same bits and block."),
            _table(["condition", "PPL", "KL", "top-1", "recovery vs RTN", "clipped", "kept", "bits/weight"], rows),
            *_img(plots, "quantize", "PPL against block size, a line per condition"),
            *[("p", n) for n in q.report.notes]]


SECTIONS = (_headline, _summary, _tasks, _seeds, _detection, _training, _bars, _patch, compensation_section,
            _sparsity, _sweep, _sinks, _tokens, _neurons, _generations, _protocol)
