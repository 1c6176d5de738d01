"""Terminal tables and lines for each command's result (rich), printed on the console the CLI passes in.

    print_repair(Console(), results, Path("runs/x"))
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from superweight.schema.record import RunRecord, SparseTraining, smallest_k
from superweight.measure.grade import GRADES, grade_words
from superweight.report.compare import CompareRow
from superweight.report.format import NO_DAMAGE, rec
from superweight.report.compensation import print_compensation, regime_sentences  # noqa: F401 (re-exported)
from superweight.report.sections import sink_sentences


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}" if abs(x) < 1e5 else f"{x:.3e}"


def print_info(out: Console, spec: str, source: str, desc, known: list) -> None:
    table = Table(title=f"{spec}", show_header=False)
    table.add_row("source", source)
    table.add_row("family", desc.family)
    table.add_row("class", desc.model_class)
    table.add_row("layers", str(desc.n_layers))
    table.add_row("d_model (rows)", str(desc.d_model))
    table.add_row("d_ff (cols)", str(desc.d_ff) + (" (per expert)" if getattr(desc, "n_experts", 0) else ""))
    if getattr(desc, "n_experts", 0):
        table.add_row("experts per layer", f"{desc.n_experts} (coordinates LAYER:EXPERT:ROW:COL; docs/moe.md)")
    table.add_row("parameters", f"{desc.n_params:,}")
    table.add_row("down-projections", f"{desc.down_proj_names[0]} ... {desc.down_proj_names[-1]}")
    table.add_row("published super weights", ", ".join(map(str, known)) or "none recorded")
    out.print(table)


def print_eval(out: Console, result) -> None:
    p = result.protocol
    table = Table(title=f"{p.model}: {p.corpus}/{p.split}, {p.n_tokens:,} tokens, "
                        f"windows {p.max_length}/{p.stride}{' after BOS' if p.bos is not None else ''}, {p.dtype}")
    table.add_column("condition")
    for col in ("NLL", "PPL", "KL(base||·)", "top-1 agree", "super act."):
        table.add_column(col, justify="right")
    rows = [("base", result.base)]
    if result.ablated:
        rows.append((p.interventions["ablated"], result.ablated))
    if result.patched:
        rows.append(("patched", result.patched))
    for name, m in rows:
        table.add_row(name, fmt(m.nll), fmt(m.ppl, 2), fmt(m.kl), f"{m.top1_agree:.1%}",
                      fmt(m.super_activation, 1))
    out.print(table)
    if result.base and result.ablated:
        out.print(f"PPL ratio ablated/base: {result.ablated.ppl / result.base.ppl:.2f}x")
    print_generations(out, result.generations)
    if result.tasks:
        print_tasks(out, result.tasks)


def print_tasks(out: Console, tasks) -> None:
    """One row per task and metric, one column per condition: value ± the harness's standard error."""
    conditions = list(tasks.scores)
    samples = ", ".join(f"{t} {i['samples']}" for t, i in tasks.tasks.items() if i.get("samples") is not None)
    table = Table(title=f"Zero-shot tasks (lm-eval {tasks.harness}; items: {samples or '?'})")
    table.add_column("task")
    table.add_column("metric")
    for c in conditions:
        table.add_column(c, justify="right")
    base = tasks.scores.get("base", {})
    for task, metrics in base.items():
        for metric in metrics:
            cells = []
            for c in conditions:
                sc = tasks.scores[c].get(task, {}).get(metric)
                cells.append("-" if sc is None else f"{sc.value:.3f}" + (f" ± {sc.stderr:.3f}" if sc.stderr is not None else ""))
            table.add_row(task, metric, *cells)
    out.print(table)


def print_generations(out: Console, rows: list[dict[str, str]]) -> None:
    gen = Table(title="Greedy generations", show_lines=True)
    for col in rows[0] if rows else []:
        gen.add_column(col, overflow="fold")
    for row in rows:
        # Text(): generated text is data, never rich markup ("[1, 2, 3" must print as is).
        gen.add_row(*[Text(repr(v)[1:-1] if k == "prompt" else v) for k, v in row.items()])
    out.print(gen)


def print_detect(out: Console, result) -> None:
    p = result.protocol
    title = "Super-weight candidates"
    if p:
        title += f" (damage on {p.corpus}/{p.split}, {p.n_tokens:,} tokens)"
    table = Table(title=title, box=box.SIMPLE_HEAD)
    where = "L:E:R:C" if any(c.expert is not None for c in result.candidates) else "L:R:C"
    cols = [where, "W", "in", "out", "×med", "KL", "PPL×", "ctrl KL", "confirmed", "grade", "found by"]
    for c in cols:
        table.add_column(c, justify="left" if c in {where, "found by", "confirmed", "grade"} else "right",
                         no_wrap=True)
    for c in result.candidates:
        ctrl = "-" if c.control_kl_top is None else f"{c.control_kl_top:.1g}/{c.control_kl_random:.1g}"
        table.add_row(
            str(c.coord), f"{c.value:.3g}", fmt(c.in_spike, 0), fmt(c.out_spike, 0),
            fmt(c.spike_ratio, 0), fmt(c.kl, 3), fmt(c.ppl_ratio, 2), ctrl,
            "[bold green]yes[/]" if c.confirmed else ("no" if c.kl is not None else "not verified"),
            {"super weight": "[bold]super weight[/]"}.get(c.grade, c.grade or "-"),
            c.source.replace("attribution:", "attr:").replace("(round ", "r").rstrip(")"),
        )
    out.print(table)
    out.print(
        "W: the weight; in/out: max |input| at its column and max |output| at its row of the down-projection "
        "in the scan; ×med: that output spike over the median layer's; KL: mean KL(base || weight zeroed), "
        "nats/token; PPL×: PPL with it zeroed / base PPL; ctrl KL: the same for the other weight that writes "
        "most (|W|·max|x|) / a random weight of the same matrix. "
        f"Confirmed: KL >= {result.settings['min_kl']} and >= {result.settings['control_factor']:g}× the worse "
        "control. Grade: " + "; ".join(f"{k}: {v}" for k, v in GRADES.items()) +
        ". found by: spike scan round n, or attribution method."
        + (" L:E:R:C: layer, expert (or shared), row, column." if where == "L:E:R:C" else "")
    )
    print_experts(out, result.candidates)
    verified = [c for c in result.candidates if c.kl is not None]
    if verified and not any(c.grade == "super weight" for c in verified):
        sensitive = [c for c in verified if c.grade == "sensitive weight"]
        out.print("[bold]No super weight: " + (
            f"the most damaging weight, {sensitive[0].coord} (PPL x{sensitive[0].ppl_ratio:.2f}), is a sensitive "
            "weight, not a collapse.[/]" if sensitive else "no candidate does damage far above its controls.[/]"))
    if not result.candidates:
        out.print("[bold]No candidates: no layer's spike stands out and attribution was off.[/]")
    if result.published:
        known = ", ".join(
            f"{k['layer']}:{k['row']}:{k['col']} ({'confirmed' if k['confirmed'] else 'detected' if k['detected'] else 'not found'})"
            for k in result.published
        )
        out.print(f"Published super weights for this model: {known}")


def print_sweep(out: Console, result) -> None:
    p = result.protocol
    table = Table(title=f"Sweep of {result.weight} (W = {result.value:.4g}): {p.corpus}/{p.split}, "
                        f"{p.n_tokens:,} tokens")
    for col in ("condition", "NLL", "PPL", "KL(base||·)", "top-1 agree", "super act."):
        table.add_column(col, justify="left" if col == "condition" else "right")
    for label, m in [("base", result.base)] + [(pt.label, pt.metrics) for pt in result.points]:
        table.add_row(label, fmt(m.nll), fmt(m.ppl, 2), fmt(m.kl), f"{m.top1_agree:.1%}",
                      fmt(m.super_activation, 1))
    out.print(table)
    print_generations(out, result.generations)


def print_repair(out: Console, r: RunRecord, run_dir) -> None:
    p = r.protocol
    table = Table(title=f"Repair ({r.recipe} recipe): {p.corpus}/eval, {p.n_tokens:,} tokens")
    for col in ("condition", "NLL", "PPL", "KL(base||·)", "top-1 agree", "super act.", "NLL-gap rec.", "KL rec."):
        table.add_column(col, justify="left" if col == "condition" else "right")
    subset = None
    for name, m, r_ in r.conditions():
        interval = getattr(m, "interval", None)
        gap = rec(r_.nll_gap) if r_ else ""
        table.add_row(name, fmt(m.nll), fmt(m.ppl, 2), fmt(m.kl), f"{m.top1_agree:.1%}",
                      fmt(m.super_activation, 1), gap + (f" [{interval[0]:.0%}, {interval[1]:.0%}]" if interval else ""),
                      rec(r_.kl) if r_ else "")
        subset = m.n_tokens if name not in ("base", "broken", "patched") and m.n_tokens != p.n_tokens else subset
    out.print(table)
    if subset:
        out.print(f"Baselines are scored on the first {subset:,} tokens, their recoveries against base and broken "
                  "over the same tokens [95% interval, block bootstrap].")
    t = r.training
    if r.verdict:
        style = {"repaired": "green", "partial": "yellow", "failed": "bold red", "nothing to repair": "cyan"}[r.verdict]
        out.print(f"[{style}]Verdict: {r.verdict}[/{style}] " + {
            "repaired": "(NLL-gap and KL recovery >= 90%)", "partial": "(better than the broken model, < 90% recovered)",
            "failed": "(the patched model is no better than the broken one on the eval tokens: do not use this patch)",
            "nothing to repair": "(zeroing the weight did no measurable damage: recovery is n/a, no patch is needed)",
        }[r.verdict])
    for line in regime_sentences(r):
        out.print(Text(line))
    if t.check is not None:
        c = t.check
        out.print(f"Held-out check ({c.tokens} train-split tokens never trained on): KL {c.broken_kl:.4g} with no "
                  f"patch, {c.best_kl:.4g} with the patch kept (step {c.best_step})"
                  + (f"; {c.backoffs} back-off(s): the patch did worse than none, lr cut 5x each" if c.backoffs else "")
                  + ("; no patch beat none: the patch is zero" if c.best_step == 0 else ""))
    out.print(f"Training: {t.steps} steps, {t.seconds:.0f} s ({t.s_per_step:.2f} s/step), "
              + (f"final KL loss {t.final_loss:.4f}" if t.final_loss is not None else "final KL loss unknown")
              + (f", resumed from step {t.resumed_from}" if t.resumed_from is not None else ""))
    for g in r.patch.rows:
        cols = "; ".join(f"d[{c.col}] = {c.value_at_col:.4g} (deleted {c.deleted_value:.4g}), "
                         f"cos(d, e_{c.col}) = {c.cos_ablated_direction:.3f}" for c in g.cols)
        out.print(f"Patch row {g.key}: ||d|| = {g.norm:.3f}, cos(d, original row) = {g.cos_original_row:.3f}; {cols}")
        if g.write_rms is not None:
            out.print(f"  invariant: write / removed = {fmt(g.write_vs_removed, 3)} (RMS of x·d over x\\[col]·deleted), "
                      f"RMS write x·d = {g.write_rms:.4g} (in residual units), cos(x·d, x·w_row) = "
                      f"{g.write_cos_original_row:.3f}, cos(x·d, x\\[{g.col}]) = {fmt(g.write_cos_ablated, 3)}, "
                      f"d\\[{g.col}]/deleted = {fmt(g.value_ratio, 3)}, balanced ||d|| = {fmt(g.balanced_norm, 3)}")
    if sd := r.seeds:
        out.print(f"Over {len(sd.values)} seeds: NLL-gap recovery {rec(sd.mean.nll_gap)} ± {rec(sd.std.nll_gap)}, "
                  f"||d|| {sd.mean.norm:.3g} ± {sd.std.norm:.2g}, "
                  f"cos(d, row) {sd.mean.cos_original_row:.3f} ± {sd.std.cos_original_row:.3f}")
    if r.tasks:
        print_tasks(out, r.tasks)
    out.print(f"Run directory: {run_dir}")


def print_analysis(out: Console, r: RunRecord, patch_line: bool = True) -> None:
    if patch_line:  # `run` has printed it with the repair
        g = r.patch
        out.print(f"Patch {g.key}: ||d|| = {g.norm:.3f}, cos(d, original row) = {g.cos_original_row:.3f}, "
                  f"cos(d, e_col) = {g.cos_ablated_direction or 0:.3f}, d[{g.col}] = {g.value_at_col or 0:.4g} "
                  f"(deleted {g.deleted_value or 0:.4g})")
    sp = r.sparsity or []
    table = Table(title=f"The patch cut to k entries: largest |d|, largest |x·d| at the massive token, random "
                        f"({r.analysis.draws} draws), {r.analysis.protocol.n_tokens:,} tokens", box=box.SIMPLE_HEAD)
    for col in ("k", "top-|d| rec.", "KL", "top-|x·d| rec.", "KL ", "random-k rec.", "KL  "):
        table.add_column(col, justify="right")
    for p in sp:
        c = p.by_contribution
        table.add_row(str(p.k), rec(p.nll_gap), fmt(p.kl), rec(c.nll_gap), fmt(c.kl),
                      rec(p.random.nll_gap) if p.random else "-", fmt(p.random.kl) if p.random else "-")
    out.print(table)
    k90 = smallest_k(sp)
    dense = sp[-1].nll_gap if sp else None
    k_rel = smallest_k(sp, 0.9 * dense) if dense is not None and dense > 0 else None
    if sp and dense is None:
        out.print(f"Recovery {NO_DAMAGE}")
    k_c = smallest_k(sp, ranking="by_contribution")
    out.print(f"Smallest top-|x·d| patch recovering >= 90% of the NLL gap: {k_c if k_c else 'none'}")
    out.print(f"Smallest top-|d| patch recovering >= 90% of the NLL gap: {k90 if k90 else 'none'}; "
              f"keeping 90% of the full patch's {rec(dense)}: {k_rel if k_rel else 'none'}")
    t = r.tokens
    for rows, title in ((t.hurt, "most hurt by the ablation"), (t.healed, "most healed by the patch")):
        out.print(f"Tokens {title}: " + ", ".join(f"{x.token!r} ({x.sum:+.1f})" for x in rows[:8]), soft_wrap=True)
    out.print("Tokens rising in the broken model: " + ", ".join(f"{x.token!r}" for x in t.rising[:8]), soft_wrap=True)
    lens = t.logit_lens
    out.print(f"Logit lens of channel {lens.row}: + " + ", ".join(repr(x.token) for x in lens.top[:8])
              + " | - " + ", ".join(repr(x.token) for x in lens.bottom[:8]), soft_wrap=True)
    if r.sinks:
        print_sinks(out, r)


def print_sinks(out: Console, r: RunRecord) -> None:
    """The mechanism view from the ablated layer on (below it every condition is the same model), and the
    headline's two sentences."""
    sk = r.sinks
    conds = list(sk.layers[0].conditions) if sk.layers else []
    first = int(sk.channel.split(":")[0])
    table = Table(title=f"Attention sink per layer from the ablated layer {first} on ({sk.windows} windows of "
                        f"{sk.window} tokens; sink: mean attention mass over heads, heads: share with mass > "
                        f"{sk.threshold:g}; ||h||: residual norm at the massive token)", box=box.SIMPLE_HEAD)
    table.add_column("layer", justify="right")
    for title in ("sink", "heads", "||h||"):
        for c in conds:
            table.add_column(f"{title} {c}", justify="right")
    table.add_column("entropy undone", justify="right")
    for e in sk.layers[first:]:
        cs = [e.conditions[c] for c in conds]
        table.add_row(str(e.layer), *[f"{c.sink_mass:.3f}" for c in cs], *[f"{c.sink_heads:.0%}" for c in cs],
                      *[fmt(c.norm_massive, 0) for c in cs],
                      "-" if e.entropy_undone is None else f"{e.entropy_undone:.1%}")
    out.print(table)
    for line in sink_sentences(r):
        out.print(Text(line))


def print_sparse(out: Console, st: SparseTraining) -> None:
    table = Table(title=f"Sparse training ({st.steps} steps each from the dense patch)", box=box.SIMPLE_HEAD)
    for col in ("method", "strength", "non-zeros", "NLL-gap rec.", "KL", "||d||", "d\\[col]", "cos(d,e_col)", "frontier"):
        table.add_column(col, justify="left" if col == "method" else "right")
    front = {(p.method, p.strength) for p in st.frontier}
    for p in st.points:
        table.add_row(p.method, f"{p.strength:g}", str(p.nnz), rec(p.nll_gap), fmt(p.kl), fmt(p.norm),
                      fmt(p.value_at_col), fmt(p.cos_ablated_direction), "yes" if (p.method, p.strength) in front else "")
    out.print(table)
    s90 = st.smallest_90
    out.print("Smallest trained sparse patch recovering >= 90%: "
              + (f"{s90.nnz} non-zeros ({s90.method}, strength {s90.strength:g})" if s90 else "none"))


def print_compare(out: Console, compared: list[CompareRow]) -> None:
    rows = [r.model_dump() for r in compared]
    table = Table(title="Runs", box=box.SIMPLE_HEAD)
    cols = [  # (title, cell)
        ("run", lambda r: r["run"]), ("model", lambda r: (r["model"] or "-").split(" (")[0].split("/")[-1]),
        ("weight", lambda r: r["weight"]), ("recipe", lambda r: r["recipe"]), ("steps", lambda r: r["steps"]),
        ("seed", lambda r: r["seed"]), ("eval tokens", lambda r: r["n_tokens"]),
        ("excluded", lambda r: r.get("excluded")), ("regime", lambda r: r.get("regime")),
        ("base PPL", lambda r: fmt(r["base_ppl"], 2)),
        ("broken PPL", lambda r: fmt(r["broken_ppl"], 2)), ("patched PPL", lambda r: fmt(r["patched_ppl"], 2)),
        ("NLL-gap rec.", lambda r: rec(r["nll_gap"])), ("KL rec.", lambda r: rec(r["kl_recovery"])),
        ("NLL-gap rec. over seeds", lambda r: f"{rec(r['seeds_nll_gap_mean'])} ± {rec(r['seeds_nll_gap_std'])} "
                                              f"(n={r['seeds']})" if r["seeds"] else None),
        ("write / removed (invariant)", lambda r: fmt(r.get("write_vs_removed"), 3)),
        ("RMS write x·d (residual units)", lambda r: fmt(r["write_rms"], 1)),
        ("balanced ||d|| (invariant)", lambda r: fmt(r["balanced_norm"], 2)),
        ("||d||", lambda r: fmt(r["norm"], 1)), ("cos(d,row)", lambda r: fmt(r["cos_original_row"])),
        ("fewest entries for 90%: top-|d|", lambda r: r["k90"]),
        ("  top-|x·d| at the massive token", lambda r: r["k90_contribution"]),
        ("  sparse training", lambda r: r["sparse_nnz90"]), ("train s", lambda r: fmt(r["seconds"], 0)),
    ]
    # One column per run, one row per quantity: a few runs with many numbers read best this way round.
    table.add_column("")
    for r in rows:
        table.add_column(r["run"], justify="right", overflow="fold")
    for title, cell in cols[1:]:
        table.add_row(title, *[_cell(cell, r) for r in rows])
    out.print(table)
    if any(r["nll_gap"] is None or r["kl_recovery"] is None for r in rows):
        out.print(f"Recovery {NO_DAMAGE}")


def _cell(cell, row: dict) -> str:
    try:
        value = cell(row)
    except (TypeError, KeyError):  # a value this run does not have
        value = None
    return "-" if value is None else str(value)


def print_experts(out: Console, candidates) -> None:
    """One line per expert holding a verified candidate: how often the router picks it at the massive tokens,
    and what pruning the whole expert does (stages/experts.py)."""
    seen = set()
    for c in candidates:
        if c.expert is None or c.expert_kl is None or (c.layer, c.expert) in seen:
            continue
        seen.add((c.layer, c.expert))
        ctrl = " / ".join(f"{k:.2g}" for k in (c.expert_control_kl_top, c.expert_control_kl_random) if k is not None)
        grade = {"super expert": "[bold]a super expert[/]", "sensitive expert": "a sensitive expert (not a super "
                 "expert)", "none": "not a super expert"}.get(c.expert_grade, "-")
        out.print(f"{expert_words(c, c.coord)}; pruning it (router logit -inf): KL {c.expert_kl:.3g}, PPL "
                  f"x{c.expert_ppl_ratio:.2f} (control experts {', '.join(c.expert_controls) or '-'}: KL "
                  f"{ctrl or '-'}): {grade}.")


def expert_words(c, holds=None) -> str:
    """'Expert 2 of layer 0 (holds 0:2:5:7): the router picks it at 100% of the 44 massive-activation tokens (61%
    of all tokens)'; the shared expert runs on every token."""
    name = f"The shared expert of layer {c.layer}" if c.expert == "shared" else f"Expert {c.expert} of layer {c.layer}"
    name += f" (holds {holds})" if holds is not None else ""
    if c.expert == "shared":
        return f"{name}: it runs on every token"
    if c.expert_picked is None:
        return name
    n = getattr(c, "massive_tokens", None)
    return (f"{name}: the router picks it at {c.expert_picked:.0%} of the{f' {n}' if n is not None else ''} "
            f"massive-activation tokens ({c.expert_picked_all:.0%} of all tokens)")


def _coord_text(c) -> str:
    return f"{c.layer}:{c.row}:{c.col}" if c.expert is None else f"{c.layer}:{c.expert}:{c.row}:{c.col}"


def print_run(out: Console, r: RunRecord, path) -> None:
    d = r.detect
    if d and d.candidates:
        top = next(c for c in d.candidates if _coord_text(c) == d.weight)
        out.print(f"Detected {len(d.candidates)} candidates, {sum(c.confirmed for c in d.candidates)} "
                  f"confirmed; repairing {d.weight}, {grade_words(d.grade)} (zeroing it: KL {top.kl:.3g}, PPL "
                  f"x{top.ppl_ratio:.2f} on the calibration text). Details: detect.json")
        if top.expert is not None and top.expert_kl is not None:
            out.print(f"{expert_words(top)}; pruning the whole expert costs KL {top.expert_kl:.3g} (PPL "
                      f"x{top.expert_ppl_ratio:.2f}): {top.expert_grade}.")
    print_repair(out, r, path)
    print_analysis(out, r, patch_line=False)
    if r.sparse_training:
        print_sparse(out, r.sparse_training)
    line = "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in (r.timings or {}).items())
    if r.cost is not None:
        line += ("; eval-pass equivalents (forward + backward): "
                 + ", ".join(f"{k} {c.forward + c.backward:.1f}" for k, c in r.cost.stages.items())
                 + f", total {r.cost.total:.1f}")
    out.print(line)
    out.print(f"Report: {path / 'report.html'}")


def print_quantize(out: Console, r) -> None:
    """The quantize table (stages/quantize.py): one row per condition, then what each did to the super weight."""
    p = r.protocol
    table = Table(title=f"{p.model}: {p.corpus}/{p.split}, {p.n_tokens:,} tokens; fp PPL {r.base.ppl:.2f}; "
                        f"super weights {', '.join(r.keep) or 'none'} ({r.keep_source})", box=box.SIMPLE_HEAD)
    for col in ("condition", "PPL", "KL(base||·)", "top-1", "recovery vs RTN", "clipped", "kept", "bits/weight"):
        table.add_column(col, justify="left" if col == "condition" else "right")
    for row in r.rows + r.patched_rows:
        rec = row.recovery.nll_gap if row.recovery else None
        table.add_row(row.name, fmt(row.ppl, 2), fmt(row.kl), f"{row.top1_agree:.1%}",
                      "-" if rec is None else f"{rec:.1%}", f"{row.n_clipped:,}", str(row.n_kept),
                      f"{row.effective_bits:.3f}")
    for a in r.activations:
        rec = a.recovery.nll_gap if a.recovery else None
        table.add_row(a.name, fmt(a.ppl, 2), fmt(a.kl), f"{a.top1_agree:.1%}", "-" if rec is None else f"{rec:.1%}",
                      "-", "-", "-")
    if r.patched is not None:
        table.add_row("patched (fp)", fmt(r.patched.ppl, 2), fmt(r.patched.kl), f"{r.patched.top1_agree:.1%}",
                      "-", "-", "-", "-")
    out.print(table)
    out.print("recovery vs RTN: (NLL_rtn - NLL) / (NLL_rtn - NLL_fp) at the same bits and block; "
              "activation rows: against the same quantization without the hold.", markup=False, highlight=False)
    for note in r.report.notes:
        out.print(Text(note))
    if r.tasks:
        print_tasks(out, r.tasks)
