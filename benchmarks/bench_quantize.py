"""The quantize sweep's budget: 4 block sizes x 4 conditions at 2,048 tokens on the embedded model, on 2 cores.

SmolLM2-135M-Instruct (embedded GGUF, fp32 cache), 4-bit min-max INT RTN of every decoder linear weight, blocks
64, 128, 256 and per channel; conditions rtn, held, clip (tensor:1e-4) and clip+restore with the published super
weight 11:507:1229; 2,048 pydoc eval tokens in windows of 512, one base pass. The budget is 3 minutes
(issue 17). Also checks that every weight is back bit for bit afterwards, and prints the table.

    .venv/bin/python benchmarks/bench_quantize.py [--threads 2] [--json quantize.json]
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch

from superweight.core.quant import Clip
from superweight.io import corpora
from superweight.io.models import load
from superweight.known import published
from superweight.stages.quantize import QuantizeConfig, run_quantize

BUDGET_S = 180.0


def digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load("smollm2-135m")
    ids = corpora.tokenize(loaded.tokenizer, corpora.load_text("pydoc", "eval"), 2048)
    before = digest(loaded.model)
    start, cpu = time.perf_counter(), time.process_time()
    result = run_quantize(loaded, QuantizeConfig(bits=[4], blocks=[64, 128, 256, "channel"], clip=Clip("tensor", 1e-4),
                                                 keep=published("smollm2-135m"), keep_source="published", max_length=512),
                          ids=ids)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert digest(loaded.model) == before, "the model was not restored bit for bit"
    print(f"fp PPL {result.base.ppl:.2f} on {result.base.n_tokens} tokens")
    print(f"{'condition':<24}{'PPL':>12}{'KL':>9}{'top-1':>8}{'clipped':>9}{'bits/w':>8}")
    for r in result.rows:
        print(f"{r.name:<24}{r.ppl:>12.2f}{r.kl:>9.3f}{r.top1_agree:>8.1%}{r.n_clipped:>9}{r.effective_bits:>8.3f}")
    verdict = "within" if seconds < BUDGET_S else "OVER"
    print(f"sweep: {len(result.rows)} conditions + base in {seconds:.1f} s on {args.threads} threads "
          f"({verdict} the {BUDGET_S:.0f} s budget; CPU time {cpu:.1f} s, i.e. {cpu / args.threads:.1f} s on "
          f"{args.threads} free cores); weights restored bit for bit")
    if args.json:
        from superweight.io.files import write_json

        write_json(args.json, {"seconds": seconds, "cpu_seconds": cpu, "threads": args.threads, "result": result.model_dump()})


if __name__ == "__main__":
    main()
