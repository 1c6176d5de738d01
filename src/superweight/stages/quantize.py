"""The quantize job: how far can this model be round-to-nearest quantized if its super weights are protected?

    result = run_quantize(loaded, QuantizeConfig(bits=[4], blocks=[64, "channel"], keep=coords))
    [(r.name, r.ppl, r.effective_bits, r.changes) for r in result.rows]

For each bits x block, four conditions (core/quant.py says what each does), all scored on the same tokens against
one base pass (measure.metrics.measure):
- rtn: plain min-max RTN of every decoder linear weight;
- held: the super weights left out of their block's range and kept in fp;
- clip: outliers clipped (--clip), then RTN; clip+restore: the same with the super weights written back in fp.
With activations, per-tensor INT-N of the down-projection (or every linear) inputs, with and without the super
activation held out. With a patch (a repair's run directory), the repaired model too: its patch kept in fp
beside the quantized weights, or merged into its row and quantized with it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, SkipValidation
from torch import nn

from superweight.core.arch import down_projection, is_moe
from superweight.core.coords import WeightCoord
from superweight.core.fakequant import QuantizedInputs, QuantizedWeights
from superweight.core.intervene import Ablation, Compose, Intervention
from superweight.core.patching import PatchData, check_fits, patched
from superweight.core.quant import Clip, QuantSpec, check_blocks, check_levels, effective_bits
from superweight.errors import UnsupportedArchitectureError
from superweight.io import corpora
from superweight.io.models import Loaded
from superweight.schema.quantize import ActRow, KeptWeight, QuantFigure, QuantReport, QuantResult, QuantRow
from superweight.measure.metrics import Scoring, measure, n_scored, protocol_of
from superweight.measure.recovery import recovery
from superweight.measure.tasks import TaskSpec
from superweight.progress import Progress, or_silent
from superweight.settings import Settings

CONDITIONS = {"rtn": (False, "none"), "held": (False, "hold"), "clip": (True, "none"), "clip+restore": (True, "restore")}


class MergedRows(Intervention):
    """Add vectors into down-projection rows in place (the patch folded into the weight); restores the rows."""

    def __init__(self, model: nn.Module, rows: list[tuple[int, int]], vectors: list[torch.Tensor]):
        self.items = [(down_projection(model, l), r, v) for (l, r), v in zip(rows, vectors)]
        self._saved: list = []

    def apply(self) -> None:
        self.active = True
        for dp, r, v in self.items:
            self._saved.append((dp, r, dp.row(r)))
            dp.set_row(r, dp.row(r) + v.to(dp.weight.dtype))

    def remove(self) -> None:
        while self._saved:
            dp, r, row = self._saved.pop()
            dp.set_row(r, row)
        self.active = False


def parse_activations(text: str | None) -> tuple[int, str] | None:
    """`int8` (down-projection inputs) or `int8:all` (every decoder linear's input); None for none."""
    from superweight.errors import UsageError

    if text is None or text == "none":
        return None
    kind, _, which = text.partition(":")
    if not (kind.startswith("int") and kind[3:].isdigit() and 2 <= int(kind[3:]) <= 8) or which not in ("", "down", "all"):
        raise UsageError(f"invalid --activations '{text}': use int8 (down-projection inputs) or int8:all "
                         "(every linear input); 2 to 8 bits")
    return int(kind[3:]), which or "down"


def auto_keep(loaded: Loaded, spec: str) -> tuple[list[WeightCoord], str]:
    """`--keep auto`: the published super weights of `spec` (known.py), else the confirmed ones `detect` finds on
    512 calibration tokens; with where they came from (published, detected or none)."""
    from superweight.known import published
    from superweight.stages.detect import DetectConfig, run_detect

    if known := published(spec):
        return known, "published"
    coords = [c.coord for c in run_detect(loaded, DetectConfig(calib_tokens=512)).candidates if c.confirmed]
    return coords, "detected" if coords else "none"


def shapes_before_load(spec: str) -> list[tuple[int, int]] | None:
    """The [out, in] shapes of the decoder linears from the model's config alone (a weightless meta-device
    build), so that --block is checked before the weights load; None when the config is not at hand (a GGUF
    file not yet converted, a hub id not in the cache): the check then runs right after the load."""
    import os

    from superweight.core.arch import decoder_linears
    from superweight.io.models import gguf_cache_dir, resolve_spec

    try:
        where, gguf_file, _kind = resolve_spec(spec)
        if gguf_file:
            cached = gguf_cache_dir(Path(where) / gguf_file)
            where = str(cached) if cached is not None else None
        if where is None or not os.path.isfile(os.path.join(where, "config.json")):
            return None
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(where, local_files_only=True)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        return [tuple(m.weight.shape[::-1] if type(m).__name__ == "Conv1D" else m.weight.shape)
                for _, m in decoder_linears(meta)]
    except Exception:  # any trouble here only postpones the check to after the load
        return None


def input_absmax(model: nn.Module, ids: torch.Tensor, max_length: int = 512,
                 bos: corpora.Bos = corpora.NO_BOS) -> dict[nn.Module, torch.Tensor]:
    """max |x| per input column of every decoder linear over `ids` (calibration tokens), in windows that start
    with `bos` when it is on."""
    from superweight.core.arch import decoder_linears, input_device
    from superweight.core.intervene import Trace

    xmax: dict[nn.Module, torch.Tensor] = {}

    def record(module, inp, _out):
        v = inp[0].detach().abs().flatten(0, -2).amax(0).float()
        xmax[module] = torch.maximum(xmax[module], v) if module in xmax else v

    with Trace({m: m for _, m in decoder_linears(model)}, record), torch.no_grad():
        span = max_length - bos.on
        for begin in range(0, ids.numel() - 1, span):
            window = corpora.with_bos(ids[begin: begin + span][None], bos)
            model(input_ids=window.to(input_device(model)), use_cache=False)
    return xmax


def damaging_outliers(model: nn.Module, spec: QuantSpec, xmax: dict[nn.Module, torch.Tensor], k: int,
                      exclude: list[WeightCoord] = ()) -> list[tuple[nn.Module, int, int]]:
    """(module, row, col) of the k weights whose clipping changes a layer's output most, most damaging first: largest (|w| - threshold) * max|x[col]| over
    every decoder linear (the clipped excess times the largest input it meets), super weights excluded."""
    from superweight.core.arch import decoder_linears, linear_matrix
    from superweight.core.quant import clip_threshold, grouped

    skip = {(down_projection(model, c.layer).module, c.row, c.col) for c in exclude}
    found: list[tuple[float, nn.Module, int, int]] = []
    for _, module in decoder_linears(model):
        matrix = linear_matrix(module).detach()
        inn = matrix.shape[1]
        g, n = grouped(matrix, spec.block)
        a = g.abs()
        thr = clip_threshold(a, spec.clip, n)
        if thr is None:
            continue
        excess = (a - thr).clamp_min_(0).view(-1)[:n]
        idx = excess.nonzero().squeeze(1)
        if not idx.numel():
            continue
        damage = excess[idx] * xmax[module].to(excess.device)[idx % inn]
        top = damage.topk(min(k + len(skip), damage.numel()))
        found += [(d, module, i // inn, i % inn) for d, i in zip(top.values.tolist(), idx[top.indices].tolist())]
    return [f[1:] for f in sorted((f for f in found if f[1:] not in skip), key=lambda f: -f[0])[:k]]


def by_module(picked: list[tuple[nn.Module, int, int]]) -> dict[nn.Module, list[tuple[int, int]]]:
    out: dict[nn.Module, list[tuple[int, int]]] = {}
    for module, r, c in picked:
        out.setdefault(module, []).append((r, c))
    return out


def _kept(coords: list[WeightCoord], q: QuantizedWeights, model) -> list[KeptWeight]:
    out = []
    for c in coords:
        dp = down_projection(model, c.layer)
        name = next(n for n, m in q.targets if m is dp.module)
        stats = q.stats.get(name)
        st = next((k for k in (stats.kept if stats else []) if (k.row, k.col) == (c.row, c.col)), None)
        if st is not None:
            out.append(KeptWeight(weight=f"{c.layer}:{c.row}:{c.col}", value=st.value, quantized=st.quantized,
                                  own_error=abs(st.quantized - st.value), step=st.step, block_rmse=st.block_rmse,
                                  block_size=st.block_size))
    return out


def _changes(row: QuantRow, rtn: QuantRow | None) -> str | None:
    """In words: did this condition change the super weight itself, or its block-mates' step (vs plain RTN)?"""
    if not row.kept:
        return None
    k = max(row.kept, key=lambda k: abs(k.value))
    if row.keep == "none" and k.own_error <= 1e-6 * abs(k.value):
        return f"nothing of {k.weight} itself: it is its block's extreme value, stored exactly ({k.value:.4g})"
    if row.keep == "none":
        return f"the weight itself: {k.weight} {k.value:.4g} -> {k.quantized:.4g}"
    base = next((b for b in (rtn.kept if rtn else []) if b.weight == k.weight), None)
    if base is None:
        return f"{k.weight} kept in fp; block step {k.step:.3g}"
    what = "restored after clipping" if row.keep == "restore" else "held out of its block's range"
    return (f"{k.weight} {what} (own error {base.own_error:.3g} under plain RTN, 0 here); its {k.block_size - 1} "
            f"block-mates' step {base.step:.3g} -> {k.step:.3g}, their RMS error {base.block_rmse:.3g} -> "
            f"{k.block_rmse:.3g}")


class QuantizeConfig(Settings):
    """What `superweight quantize` measures (its defaults), checked when made."""

    bits: list[int] = Field([4], min_length=1, description="weight bits, each 2-8")
    blocks: list[int | str] = Field([64, 128, 256, "channel"], min_length=1, description="block sizes, channel, tensor")
    levels: str = Field("int", description="int (min-max RTN) or nf (NormalFloat)")
    clip: Clip | None = Field(Clip("tensor", 1e-4), description="outlier clipping before RTN (None: none)")
    keep: list[WeightCoord] = Field([], description="the super weights to hold, clip and restore")
    keep_source: str = Field("given", description="where `keep` came from: given, published, detected, none")
    activations: tuple[int, str] | None = Field(None, description="(bits, down or all): activations too")
    corpus: str = corpora.DEFAULT_CORPUS
    split: str = "eval"
    max_tokens: int = Field(2048, ge=2, description="tokens of the corpus to score")
    max_length: int = Field(512, description="window length in tokens")
    protect: list[int] = Field([], description="with clip: K, ... clipped weights restored besides `keep`")
    tasks: Annotated[TaskSpec | None, SkipValidation] = None

    def model_post_init(self, _ctx) -> None:
        check_levels(self.levels, self.bits)
        corpora.check_windows(self.max_length)


def run_quantize(loaded: Loaded, cfg: QuantizeConfig | None = None, ids=None, patch: PatchData | None = None,
                 calib_ids=None, progress: Progress | None = None) -> QuantResult:
    """Score every condition of `cfg` on the same tokens (`ids`, else cfg.max_tokens of cfg.corpus/cfg.split)
    against one base pass; with `patch` the repaired model too; `calib_ids`: the train-split tokens that rank the
    clipped weights for cfg.protect (else 1024 read here). `progress` hears of the scored tokens."""
    cfg = cfg or QuantizeConfig()
    bits, blocks, levels, clip, keep, protect = cfg.bits, cfg.blocks, cfg.levels, cfg.clip, cfg.keep, cfg.protect
    corpus, split, max_length, tasks = cfg.corpus, cfg.split, cfg.max_length, cfg.tasks
    progress = or_silent(progress)
    start = time.perf_counter()
    model = loaded.model
    if is_moe(model):  # the fused 3-D expert tensors are no nn.Linear: RTN would leave most of the model in fp
        raise UnsupportedArchitectureError("quantize does not support mixture-of-experts models yet: their experts "
                                           "are fused 3-D tensors, not the linear layers it quantizes")
    keep = list(keep)
    probe = QuantizedWeights(model, QuantSpec(bits[0], blocks[0]), keep)  # validates coordinates, lists targets
    shapes = probe.shapes()
    check_blocks(list(blocks), shapes)
    if patch is not None:
        check_fits(model, patch)
    conds = [c for c, (clipped, mode) in CONDITIONS.items() if (clip or not clipped) and (keep or mode == "none")]
    plan: dict[str, tuple[int, int | str, str, QuantizedWeights]] = {}
    for b in bits:
        for blk in blocks:
            for c in conds:
                clipped, mode = CONDITIONS[c]
                spec = QuantSpec(b, blk, levels, clip if clipped else None)
                plan[f"{b}b/{blk}/{c}"] = (b, blk, c, QuantizedWeights(model, spec, keep, mode))
    if clip is not None and protect:
        if calib_ids is None:
            calib_ids = corpora.tokenize(loaded.tokenizer, corpora.load_text(corpus, "train"), 1024)
        xmax = input_absmax(model, calib_ids, max_length, loaded.bos)
        for blk in blocks:
            ranked = damaging_outliers(model, QuantSpec(bits[0], blk, levels, clip), xmax, max(protect), keep)
            for b in bits:
                for k in protect:
                    spec = QuantSpec(b, blk, levels, clip)
                    q = QuantizedWeights(model, spec, keep, "restore", extra=by_module(ranked[:k]))
                    plan[f"{b}b/{blk}/clip+top{k}"] = (b, blk, f"clip+top{k}", q)
    order = {b: i for i, b in enumerate(bits)}, {blk: i for i, blk in enumerate(blocks)}
    plan = dict(sorted(plan.items(), key=lambda kv: (order[0][kv[1][0]], order[1][kv[1][1]])))  # stable
    conditions: dict[str, Intervention] = {n: q for n, (*_, q) in plan.items()}
    described = {n: f"{q.spec}; super weights: {q.mode}" for n, q in conditions.items()}
    acts: dict[str, tuple[int, str, bool]] = {}
    if cfg.activations is not None:
        abits, which = cfg.activations
        for hold in ([False, True] if keep else [False]):
            name = f"a{abits}/{which}" + ("+hold-sa" if hold else "")
            acts[name] = (abits, which, hold)
            conditions[name] = QuantizedInputs(model, abits, which, keep if hold else ())
            described[name] = (f"per-tensor INT{abits} of {'down-projection' if which == 'down' else 'every linear'}"
                               f" inputs" + ("; super activation in fp" if hold else ""))
    patched_plan: dict[str, tuple[int, int | str, str, QuantizedWeights | None]] = {}
    if patch is not None:
        def repaired(*extra):
            return Compose(patched(model, patch.ablated, patch.rows, patch.vectors), *extra)

        conditions["patched"] = repaired()
        described["patched"] = "the repaired model (super weights ablated, patch added) in fp"
        for b in bits:
            for blk in blocks:
                q = QuantizedWeights(model, QuantSpec(b, blk, levels), [])
                patched_plan[f"{b}b/{blk}/patched-rtn"] = (b, blk, "patched-rtn", q)
                conditions[f"{b}b/{blk}/patched-rtn"] = repaired(q)
                qm = QuantizedWeights(model, QuantSpec(b, blk, levels), [])
                patched_plan[f"{b}b/{blk}/patched-merged"] = (b, blk, "patched-merged", qm)
                conditions[f"{b}b/{blk}/patched-merged"] = Compose(
                    Ablation(model, patch.ablated), MergedRows(model, patch.rows, patch.vectors), qm)
                described[f"{b}b/{blk}/patched-rtn"] = f"repaired, {q.spec}, patch in fp"
                described[f"{b}b/{blk}/patched-merged"] = f"repaired, patch merged into its row, {qm.spec}"
    if ids is None:
        ids = corpora.tokenize(loaded.tokenizer, corpora.load_text(corpus, split), cfg.max_tokens)
    channels = sorted({(c.layer, c.row) for c in keep})
    bos = loaded.bos
    progress.stage(f"Scoring {len(conditions)} conditions", n_scored(ids.numel(), max_length, bos=bos))
    results = measure(model, ids, conditions, channels, max_length, bos=bos,
                      scoring=Scoring(progress=progress.advance))
    base = results["base"]
    n_weights = sum(o * i for o, i in shapes)

    def row_of(name, b, blk, cond, q, mode, clipped, ref=None) -> QuantRow:
        m = results[name]
        n_kept = len(keep) + q.n_extra if mode != "none" else 0
        return QuantRow(
            **m.model_dump(), name=name, condition=cond, bits=b, block=str(blk), levels=levels,
            clip=str(clip) if clipped else None, keep=mode, n_clipped=q.n_clipped(), n_kept=n_kept,
            effective_bits=effective_bits(b, shapes, blk, n_kept),
            recovery=recovery(base, ref, m) if ref is not None else None, kept=_kept(keep, q, model))

    rows: list[QuantRow] = []
    for name, (b, blk, c, q) in plan.items():
        clipped, mode = CONDITIONS.get(c, (True, "restore"))
        ref = results[f"{b}b/{blk}/rtn"] if c != "rtn" else None
        rows.append(row_of(name, b, blk, c, q, mode, clipped, ref))
    by_name = {r.name: r for r in rows}
    for r in rows:
        r.changes = _changes(r, by_name.get(f"{r.bits}b/{r.block}/rtn"))
    patched_rows = [row_of(n, b, blk, c, q, "none", False, results.get(f"{b}b/{blk}/rtn"))
                    for n, (b, blk, c, q) in patched_plan.items()]
    act_rows = []
    for name, (abits, which, hold) in acts.items():
        ref = results[f"a{abits}/{which}"] if hold else None
        act_rows.append(ActRow(**results[name].model_dump(), name=name, bits=abits, which=which, hold=hold,
                               recovery=recovery(base, ref, results[name]) if ref is not None else None))
    scores = None
    if tasks is not None:
        from superweight.measure.tasks import run_tasks

        for q in [q for *_, q in plan.values()]:
            q.eager = True  # many small passes: quantize once per condition
        scores = run_tasks(loaded, tasks, conditions, progress)
    protocol = protocol_of(loaded, corpus, split, base.n_tokens, max_length, max_length, described)
    result = QuantResult(
        protocol=protocol, base=base, keep=[f"{c.layer}:{c.row}:{c.col}" for c in keep], keep_source=cfg.keep_source,
        n_weights=n_weights, shapes=sorted(set(shapes)), rows=rows, activations=act_rows,
        patched=results.get("patched"), patched_rows=patched_rows, tasks=scores,
    )
    result.report = QuantReport(figures=figures(result), notes=notes(result))
    result.seconds = time.perf_counter() - start
    return result


def figures(result: QuantResult) -> list[QuantFigure]:
    """PPL against block size, one line per condition (log y), one figure per bit width."""
    out = []
    for b in sorted({r.bits for r in result.rows}):
        rows = [r for r in result.rows + result.patched_rows if r.bits == b]
        xs = list(dict.fromkeys(r.block for r in rows))
        series = {}
        for cond in dict.fromkeys(r.condition for r in rows):
            ppl = {r.block: r.ppl for r in rows if r.condition == cond}
            series[cond] = [ppl.get(x) for x in xs]
        series["fp (base)"] = [result.base.ppl] * len(xs)
        out.append(QuantFigure(title=f"{b}-bit {rows[0].levels.upper()} RTN: PPL by block size", x_label="block",
                               y_label="PPL", log_y=True, x=xs, series=series))
    return out


def notes(result: QuantResult) -> list[str]:
    """Findings in words: at each bits x block, whether clipping collapsed the model and what restoring did."""
    out = []
    by = {r.name: r for r in result.rows}
    for r in result.rows:
        if r.condition != "rtn":
            continue
        key = f"{r.bits}b/{r.block}"
        held, clip, rest = by.get(f"{key}/held"), by.get(f"{key}/clip"), by.get(f"{key}/clip+restore")
        parts = [f"{key}: plain RTN PPL {r.ppl:.4g}"]
        if held:
            parts.append(f"held {held.ppl:.4g}")
        if clip:
            parts.append(f"clipped {clip.ppl:.4g} ({clip.n_clipped} weights)")
        if rest:
            parts.append(f"clipped + restored {rest.ppl:.4g}")
        out.append(", ".join(parts) + f" (fp {result.base.ppl:.4g})")
        for x in (held, clip, rest):
            if x is not None and x.changes:
                out.append(f"{x.name} changes {x.changes}")
    return out
