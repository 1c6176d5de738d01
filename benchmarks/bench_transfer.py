"""Does a repair recipe give the same result on the same model in another parametrization?

The embedded SmolLM2-135M, its super weight 11:507:1229, layer 11's MLP rescaled without changing the model's
function (`superweight.core.reparam.rescale_mlp`: neuron j's up_proj row x a_j, down_proj column / a_j) at
uniform scales a in {0.01, 0.1, 1, 10, 100} and at per-neuron log-normal factors (exp(N(0, 1.5^2)), seed 0).
For each recipe (the default `balanced`, `quick`, `sgd`) and each parametrization, side by side:

- NLL-gap recovery on 2,048 pydoc eval tokens (windows of 512; logits checked unchanged by the rescaling);
- training seconds;
- an invariant size of the patch: RMS over eval tokens of what it writes into the row (x · d);
- the smallest sparse patch recovering >= 90%: the patch cut to its k entries that write most at the token
  where it writes most (|x_j d_j| there, an invariant ranking), scored on 1,024 eval tokens for
  k in 1, 2, 3, 4, 8, 16, ..., d_ff (searched only when the whole patch recovers >= 90%).

    .venv/bin/python benchmarks/bench_transfer.py [--out transfer.json]     # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, Compose, RowPatch, intact_values
from superweight.core.reparam import rescale_mlp
from superweight.io import corpora
from superweight.io.models import load
from superweight.measure.geometry import geometry
from superweight.measure.inputs import down_inputs
from superweight.measure.metrics import Scoring, measure
from superweight.measure.sparsity import keep_entries
from superweight.engine.config import RECIPES
from superweight.engine.train import train, training_sequences

WEIGHT = WeightCoord(layer=11, row=507, col=1229)
ROWS = [(11, 507)]
SCALES = ["0.01", "0.1", "1", "10", "100", "lognormal"]
RECIPE_NAMES = ["balanced", "quick", "sgd"]


def factors(scale: str, d_ff: int) -> torch.Tensor | float:
    if scale == "lognormal":
        return torch.exp(1.5 * torch.randn(d_ff, generator=torch.Generator().manual_seed(0)))
    return float(scale)


def gap(m, base, broken) -> float:
    return (broken.nll - m.nll) / (broken.nll - base.nll)


def smallest_sparse(model, ids, vector: torch.Tensor, target: float = 0.9) -> int | None:
    """Fewest entries, ranked by |x_j d_j| at the token where x · d is largest, recovering `target`."""
    x, _ = down_inputs(model, ids, WEIGHT.layer)
    t = int((x @ vector).abs().argmax())
    order = (x[t] * vector).abs().argsort(descending=True)
    n = vector.numel()
    ablation = Ablation(model, [WEIGHT])
    for ks in ([1, 2, 3, 4], [k for k in (8, 16, 32, 64, 128, 256, 512, 1024) if k < n] + [n]):  # cheap ones first
        conds = {"broken": ablation}
        conds |= {f"k{k}": Compose(ablation, RowPatch(model, ROWS, keep_entries([vector], order[:k]))) for k in ks}
        m = measure(model, ids, conds, max_length=512, scoring=Scoring(share_below=WEIGHT.layer))
        found = next((k for k in ks if gap(m[f"k{k}"], m["base"], m["broken"]) >= target), None)
        if found is not None:
            return found
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--scales", default=",".join(SCALES), help="comma-separated subset of " + ",".join(SCALES))
    ap.add_argument("--table", default=None, help="print the table of a JSON-lines file of rows and stop")
    args = ap.parse_args()
    if args.table:
        with open(args.table, encoding="utf-8") as f:
            print_table([json.loads(line) for line in f if line.startswith("{")])
        return
    scales = args.scales.split(",")
    loaded = load("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    ev = corpora.tokenize(tok, corpora.load_text("pydoc", "eval"), args.eval_tokens)
    sparse_ids = ev[:1024]
    mlp = down_projection(model, WEIGHT.layer).block.mlp
    intact = {k: v.clone() for k, v in mlp.state_dict().items()}
    probe = ev[None, :64]
    with torch.no_grad():
        ref_logits = model(input_ids=probe).logits
    rows = []
    for scale in scales:
        mlp.load_state_dict(intact)
        rescale_mlp(model, WEIGHT.layer, factors(scale, down_projection(model, WEIGHT.layer).d_ff))
        with torch.no_grad():
            drift = (model(input_ids=probe).logits - ref_logits).abs().max().item()
        patches, seconds = {}, {}
        for name in RECIPE_NAMES:
            cfg = RECIPES[name]
            seqs, mask = training_sequences(tok, "pydoc", cfg)
            t = time.perf_counter()
            patches[name], _ = train(model, [WEIGHT], ROWS, (seqs, mask), cfg)
            seconds[name] = time.perf_counter() - t
        ablation = Ablation(model, [WEIGHT])
        m = measure(model, ev, {"broken": ablation} | {n: Compose(ablation, p) for n, p in patches.items()},
                    max_length=512, scoring=Scoring(share_below=WEIGHT.layer))
        x = {WEIGHT.layer: down_inputs(model, ev, WEIGHT.layer)[0]}
        originals = intact_values(model, [WEIGHT])
        for name, p in patches.items():
            g = geometry(model, [WEIGHT], ROWS, p.vectors, originals, x)
            recovered = gap(m[name], m["base"], m["broken"])
            row = {"scale": scale, "recipe": name, "recovery": recovered,
                   "seconds": seconds[name], "write_rms": g.write_rms, "norm": g.norm,
                   # no part of a patch can do what the whole one does not (None: the whole is below 90%)
                   "smallest_90": smallest_sparse(model, sparse_ids, p.vectors[0].detach().float().cpu())
                   if recovered >= 0.9 else None,
                   "logit_drift": drift}
            rows.append(row)
            print(json.dumps(row), flush=True)
    mlp.load_state_dict(intact)
    print_table(rows)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


def print_table(rows: list[dict]) -> None:
    print(f"\nNLL-gap recovery / training s / RMS write x·d / ‖d‖ / fewest entries for 90%, per rescaling of layer 11")
    print(f"{'scale':>10} | " + " | ".join(f"{n:^38}" for n in RECIPE_NAMES))
    for scale in [s for s in SCALES if any(r["scale"] == s for r in rows)]:
        cells = []
        for n in RECIPE_NAMES:
            r = next(r for r in rows if r["scale"] == scale and r["recipe"] == n)
            r["write_rms"] = r["write_rms"] or 0.0
            k = r["smallest_90"] if r["smallest_90"] is not None else "-"
            cells.append(f"{r['recovery']:7.1%} {r['seconds']:4.0f}s {r['write_rms']:8.1f} {r['norm']:9.3g} k={k!s:>4}")
        print(f"{scale:>10} | " + " | ".join(cells))
    for n in RECIPE_NAMES:
        rec = [r["recovery"] for r in rows if r["recipe"] == n]
        ks = [r["smallest_90"] for r in rows if r["recipe"] == n]
        print(f"{n}: recovery min {min(rec):.1%}, max {max(rec):.1%}, spread {100 * (max(rec) - min(rec)):.2f} "
              f"points; fewest entries for 90%: {ks}")
    print(f"max |logit change| from the rescaling: {max(r['logit_drift'] for r in rows):.2e}")


if __name__ == "__main__":
    main()
