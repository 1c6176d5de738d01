"""The report's plots: each draws one figure from the run record (or the train log) and returns it, or None
without data; `draw_plots` writes every one the data allows as plots/NAME.png. Also the figures of the
commands that write no run directory: `superweight sweep` (`save_sweep_plot`) and `quantize`."""

from __future__ import annotations

from pathlib import Path

from superweight.io.files import write_atomic
from superweight.schema.record import RunRecord


def _figure(ncols: int = 1):
    # A bare Figure renders PNGs with Agg without touching pyplot's global backend or figure registry.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _plot_loss(r: RunRecord, log: list[dict]):
    if not log:
        return None
    fig, ax = _figure()
    losses = [e["loss"] for e in log]
    ax.plot([e["step"] for e in log], losses, color="tab:blue")
    ax.set(xlabel="step", ylabel="KL loss, nats/token", title="patch training",
           yscale="log" if min(losses) > 0 else "linear")
    return fig


def _plot_ppl_kl(r: RunRecord, log):
    conds = [(n, m) for n, m, _ in r.conditions()]
    fig, (a, b) = _figure(2)
    color = {"base": "tab:green", "broken": "tab:red", "patched": "tab:blue"}
    kl = [(n, m.kl) for n, m in conds if n != "base" and m.kl > 0]  # log axis: no zeros
    for ax, bars, title in ((a, [(n, m.ppl) for n, m in conds], "PPL"), (b, kl, "KL(base || cond.)")):
        names = [n for n, _ in bars]
        ax.bar(names, [v for _, v in bars], color=[color.get(n, "tab:gray") for n in names])
        ax.set(yscale="log", title=title)
        for tick in ax.get_xticklabels():
            tick.set(rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
    return fig


def _plot_sparsity(r: RunRecord, log):
    from matplotlib.ticker import ScalarFormatter

    # Without damage every recovery is undefined (None): nothing to draw.
    sp = sorted((e for e in r.sparsity or [] if e.nll_gap is not None), key=lambda e: e.k)
    points, frontier = (r.sparse_training.points, r.sparse_training.frontier) if r.sparse_training else ([], [])
    points = [p for p in points if p.nll_gap is not None]
    if not sp and not points:
        return None
    fig, ax = _figure()
    if sp:
        ks = [e.k for e in sp]
        ax.plot(ks, [e.nll_gap for e in sp], "o-", label="top-k of trained patch")
        ax.plot(ks, [e.by_contribution.nll_gap for e in sp], "D-", color="tab:orange",
                label="top-k by |x·d| at the massive token")
        rand = [e for e in sp if e.random is not None]
        draws = max((e.random.draws for e in rand), default=0)
        ax.plot([e.k for e in rand], [e.random.nll_gap for e in rand], "s--", color="tab:gray",
                label=f"random-k (mean of {draws} draws)")
    for method, marker in (("l1", "^"), ("l0", "v")):
        pts = [p for p in points if p.method == method and p.nnz]
        if pts:
            ax.scatter([p.nnz for p in pts], [p.nll_gap for p in pts], marker=marker, label=f"trained {method}")
    front = sorted((p for p in frontier if p.nnz), key=lambda p: p.nnz)
    if front:
        ax.step([p.nnz for p in front], [p.nll_gap for p in front], where="post", color="tab:purple",
                label="sparse-training frontier")
    ax.axhline(1.0, ls="--", lw=0.8, color="k", label="full recovery")
    ax.axhline(0.9, ls="--", lw=0.8, color="tab:red", label="90%")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 2, 4, ... rather than 2^0, 2^1, ...
    ax.set(xlabel="k non-zero entries in the patch row", ylabel="NLL-gap recovery")
    ax.legend(fontsize=7)
    return fig


def _plot_sweep(r: RunRecord, log):
    sweep = sorted((s for s in r.sweep or [] if s.metrics.ppl), key=lambda s: s.scale)
    if not sweep:
        return None
    fig, ax = _figure()
    ax.plot([s.scale for s in sweep], [s.metrics.ppl for s in sweep], "o-")
    ax.set(yscale="log", xlabel="scale of the super weight (1 = unchanged, 0 = ablated)", ylabel="perplexity")
    return fig


def _plot_sinks(r: RunRecord, log):
    sk = r.sinks
    if not sk or not sk.layers:
        return None
    fig, ax = _figure()
    xs = [e.layer for e in sk.layers]
    style = {"base": ("tab:green", "o-"), "broken": ("tab:red", "s-"), "patched": ("tab:blue", "^--")}
    for name in sk.layers[0].conditions:
        color, fmt = style.get(name, ("tab:gray", "o-"))
        mean = [e.conditions[name].sink_mass for e in sk.layers]
        std = [e.conditions[name].sink_mass_std for e in sk.layers]
        ax.plot(xs, mean, fmt, color=color, label=name, markersize=4)
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                        alpha=0.12, lw=0)
    ax.axvline(int(sk.channel.split(":")[0]), ls=":", lw=0.8, color="k", label="ablated layer")
    if sk.breaks_at is not None:
        ax.axvline(sk.breaks_at, ls="--", lw=0.8, color="tab:red", label="sink breaks")
    ax.set(xlabel="layer", ylabel="attention mass on the sink token(s)", ylim=(0, 1),
           title="attention sink per layer (mean over heads; band: ± std over heads)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    return fig


def compensation_figure(c):
    """Recovery against the writing neurons excluded (the compensation frontier), or None without points."""
    if c is None or not c.points:
        return None
    fig, ax = _figure()
    ks = [p.k for p in c.points]
    x = [max(k, 0.5) for k in ks]  # k = 0 drawn at 0.5 on the log axis
    for field, label, style in (("nll_gap", "NLL-gap recovery", "o-"), ("kl_recovery", "KL recovery", "s--"),
                                ("check_recovery", "held-out KL recovery", "^:")):
        ys = [getattr(p, field) for p in c.points]
        ax.plot([xi for xi, y in zip(x, ys) if y is not None], [y for y in ys if y is not None], style, label=label)
    ax.axhline(c.stop_below, color="tab:gray", lw=0.8)
    ax.set(xscale="log", xlabel="writing neurons excluded (0 at 0.5)", ylabel="recovery",
           title=f"compensation frontier, row {c.row}")
    ax.legend(fontsize=7)
    return fig


PLOTS = {"loss": _plot_loss, "ppl_kl": _plot_ppl_kl, "sparsity": _plot_sparsity, "sweep": _plot_sweep,
         "sinks": _plot_sinks, "compensation": lambda r, log: compensation_figure(r.compensation)}


def draw_plots(r: RunRecord, log: list[dict], out: Path) -> dict[str, Path]:
    """Draw every plot the data allows into out/NAME.png; return {NAME: path}."""
    plots = {}
    for name, draw in PLOTS.items():
        fig = draw(r, log)
        if fig is not None:
            plots[name] = write_atomic(out / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return plots


def sweep_figure(result):
    """PPL (log scale) and KL against scale; spread drawn as horizontal dashed lines (result: stages.sweep's)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    pts = sorted((p for p in result.points if p.scale is not None), key=lambda p: p.scale)
    xs = [p.scale for p in pts]
    ax.plot(xs, [p.metrics.ppl for p in pts], "o-", color="tab:blue", label="PPL")
    ax.axhline(result.base.ppl, color="tab:blue", lw=0.8, alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel(f"scale of W = {result.value:.4g} at {result.weight}")
    ax.set_ylabel("perplexity", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, [p.metrics.kl for p in pts], "s--", color="tab:red", label="KL(base||·)")
    ax2.set_ylabel("KL(base || scaled), nats/token", color="tab:red")
    for p in result.points:
        if p.scale is None:
            ax.axhline(p.metrics.ppl, color="tab:blue", ls=":", label=f"{p.label} PPL")
            ax2.axhline(p.metrics.kl, color="tab:red", ls=":", label=f"{p.label} KL")
    pr = result.protocol
    ax.set_title(f"{pr.model.split(' ')[0]}: {pr.corpus}/{pr.split}, {pr.n_tokens} tokens", fontsize=9)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


def save_sweep_plot(result, path) -> Path:
    """`superweight sweep`'s plot, written atomically as a PNG at `path`."""
    fig = sweep_figure(result)
    return write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def quantize_figure(result):
    """PPL against block size (log y), a line per condition, a panel per bit width (result: schema.quantize)."""
    figs = result.report.figures
    if not figs:
        return None
    fig, axes = _figure(len(figs))
    axes = axes if len(figs) > 1 else [axes]
    for ax, f in zip(axes, figs):
        markers = "os^vDPX*hp<>"
        for i, (label, ys) in enumerate(f.series.items()):
            style = "k--" if label.startswith("fp") else f"{markers[i % len(markers)]}-"
            ax.plot(f.x, [float("nan") if y is None else y for y in ys], style, label=label,
                    markersize=7 - (i % 3) * 1.5, alpha=0.85)  # sizes differ so that equal lines stay visible
        ax.set(xlabel=f.x_label, ylabel=f.y_label, title=f.title, yscale="log" if f.log_y else "linear")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    return fig


def save_quantize_plot(result, path) -> Path | None:
    fig = quantize_figure(result)
    if fig is None:
        return None
    return write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
