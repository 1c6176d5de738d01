"""One flat row per run directory, for a table comparing runs (`superweight compare`)."""

from __future__ import annotations

from pathlib import Path

from superweight.report.load import load_run, smallest_k, weight_of


def compare_rows(run_dirs: list[str | Path]) -> list[dict]:
    """One flat dict per run directory, for a table comparing runs (missing values are None)."""
    rows = []
    for run_dir in run_dirs:
        run, r = load_run(run_dir)
        rec, p, train = r.get("recovery") or {}, r["patch"], r.get("training") or {}
        smallest = (r.get("sparse_training") or {}).get("smallest_90") or {}
        seeds = r.get("seeds") or {}
        rows.append({
            "run": run.resolve().name, "model": (r.get("protocol") or {}).get("model"), "weight": weight_of(r),
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
