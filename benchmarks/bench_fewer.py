"""Do the sink view and the scale sweep move with fewer tokens? Prints the figures the report shows from the sink
view at 1,024 and 512 tokens and from the scale sweep on 1,024 tokens and on their first window (what `run`
reads since issue 28), for the given weight, with a run's trained patch or else the oracle patch (the deleted
weight put back as a row patch). docs/measurements.md holds the embedded model's answer.

    .venv/bin/python benchmarks/bench_fewer.py smollm2-135m 11:507:1229 [RUN_DIR]
"""
import sys, time
import torch
from superweight.io import models, corpora
from superweight.io.placement import Placement
from superweight.core.coords import parse_coord
from superweight.core.intervene import Ablation, RowPatch, Compose
from superweight.core.arch import down_projection
from superweight.measure.sinks import sink_view
from superweight.measure.metrics import measure, Scoring
from superweight.settings import revalidated
spec, coord = sys.argv[1], parse_coord(sys.argv[2])
loaded = models.load(spec, Placement(device="cpu", dtype="fp32"))
model = loaded.model
ids = corpora.tokenize(loaded.tokenizer, corpora.load_text("pydoc", "eval"), 1024)
dp = down_projection(model, coord.layer)
if len(sys.argv) > 3:
    from superweight.io.patchfile import load_patch
    d = load_patch(sys.argv[3]).vectors[0].float()
else:
    d = torch.zeros(dp.d_ff); d[coord.col] = dp.get(coord.row, coord.col).item()
ab = Ablation(model, [coord])
conds = {"broken": ab, "patched": Compose(ab, RowPatch(model, [(coord.layer, coord.row)], [d]))}
for n in (1024, 512):
    t = time.time()
    v = sink_view(model, ids, conds, (coord.layer, coord.row), loaded.bos, window=256, max_tokens=n, share_below=coord.layer)
    b = v.breaks_at
    at = b if b is not None else len(v.layers) - 1
    s = lambda name: v.layers[at].conditions[name]
    print(f"sinks {n} tokens: breaks_at {b}, restored {v.restored}, at layer {at} mass base/broken/patched "
          f"{s('base').sink_mass:.4f}/{s('broken').sink_mass:.4f}/{s('patched').sink_mass:.4f}, heads "
          f"{s('base').sink_heads:.3f}/{s('broken').sink_heads:.3f}, "
          f"undone mean {sum(e.entropy_undone for e in v.layers if e.entropy_undone is not None)/max(1,sum(e.entropy_undone is not None for e in v.layers)):.4f} ({time.time()-t:.0f}s)", flush=True)
    print("   summary:", {k: getattr(v, k) for k in ("breaks_at", "restored", "n_tokens", "windows")}, flush=True)
    print("   mean sink mass per layer base/broken/patched:", [(e.layer, round(e.conditions['base'].sink_mass, 3), round(e.conditions['broken'].sink_mass, 3), round(e.conditions['patched'].sink_mass, 3)) for e in v.layers][-6:], flush=True)
scales = (0.5, 0.0, -1.0, 2.0)
m = measure(model, ids, {f"s{s}": Ablation(model, [revalidated(coord, scale=s)]) for s in scales}, max_length=512,
            bos=loaded.bos, scoring=Scoring(share_below=coord.layer, subsets={f"s{s}": 500 for s in scales}))
full = measure(model, ids, {f"s{s}": Ablation(model, [revalidated(coord, scale=s)]) for s in scales}, max_length=512,
            bos=loaded.bos, scoring=Scoring(share_below=coord.layer))
for tag, mm, b in (("all", full, "base"), ("first window", m, "base@500")):
    print(f"sweep {tag} ({mm[b].n_tokens} tokens): base PPL {mm[b].ppl:.2f}; " + ", ".join(
        f"x{s}: PPL {mm[f's{s}'].ppl:.2f} (x{mm[f's{s}'].ppl/mm[b].ppl:.3f}, KL {mm[f's{s}'].kl:.3f}, top1 {mm[f's{s}'].top1_agree:.3f})" for s in scales), flush=True)
