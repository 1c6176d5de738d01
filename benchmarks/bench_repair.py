"""Cost of one repair step: `superweight.engine.train.train` versus the seed's two-copy distillation loop.

Both implementations train the same thing on the same batches (`engine.train.batch_indices`, batch 2 x 128
tokens, AdamW lr 1e-3 / weight decay 0.01, constant lr): a vector d (length d_ff) added to row `row` of the
ablated down-projection, out[..., row] += x @ d, fitted by KL(teacher || student) over all tokens.

  ours  train(model, coords, rows, sequences, None, FirstOrderConfig(..., teacher_cache_mb=0)): ONE model copy;
        teacher = the intact model under no_grad, student = the same model with the weight ablated and a
        RowPatch on; the blocks below the edited layer run once (teacher) and are reused by the student.
  seed  TWO copies: teacher = copy.deepcopy(model); student = the model with W[row, col] zeroed in place,
        every parameter frozen, and d added by a forward hook. Per step a full teacher forward (no_grad),
        a full student forward and backward, F.kl_div(log_softmax(student), log_softmax(teacher),
        log_target=True, reduction="batchmean") over the flattened [batch*tokens, vocab] rows.

Each (implementation, model) pair runs in its OWN subprocess (this script with --only), because a process's
peak memory cannot be reset: the peak covers loading the model, the data, and every step, i.e. what a user
of that implementation needs in RAM. The first step is a warm-up and is not timed; s/step is the mean over
steps 2..K. Step-1 losses of the two must agree (both start from d = 0 on the same batch), which checks that
they do the same work.

Memory, in three figures per subprocess, because peak RSS alone misleads. Both models load from a
safetensors checkpoint, as a hub model does, and transformers memory-maps it: an fp32 model's weights can
stay clean, file-backed pages of that file (the kernel may drop them and read them again), while bf16
weights are converted, so they are the process's own (anonymous) memory, and the fp32 file's pages the
conversion touched are counted too while it runs. So peak RSS can be higher for bf16 than for fp32 though
bf16 needs half the memory.
  peak anon MB    the largest RssAnon (/proc/self/status) seen: the process's own memory (weights it copied
                  or converted, activations, gradients, optimiser state, torch); sampled every 5 ms by a
                  thread, so a spike shorter than that can be missed
  mapped MB       the largest resident size of the memory-mapped checkpoint files (*.safetensors, from
                  /proc/self/smaps; read after loading and after the last step) and, beside it, the largest
                  RssFile sampled (every file-backed page: the checkpoint, torch's shared libraries)
  peak RSS MB     VmHWM (/proc/self/status), the kernel's exact peak of anonymous + file-backed + shared
                  resident pages (what getrusage's ru_maxrss reports)

Models: `smollm2-135m` (embedded, super weight 11:507:1229; loaded from superweight's fp32 cache of the GGUF,
a safetensors file) and, unless --no-olmo, an OLMo-1B-shaped model (allenai/OLMo-1B-0724-hf's config,
random weights from torch.manual_seed, random token ids; 1:1764:1710, ~4.7 GB a copy, ~15 s a seed-style
step on one busy core), saved once as an fp32 safetensors checkpoint (--olmo-dir, default a temporary folder,
~4.7 GB of disk) and loaded from it by every subprocess.

Reading the ratios (ours / seed; lower is better): peak RSS ratio target <= 0.65, s/step ratio target <= 0.8.
RSS = torch (~230 MB) + weights + step temporaries (several [batch, tokens, vocab] fp32 tensors, ~50 MB
each at 2 x 128 x 49k); the second copy is the only difference, so the ratio tends to ~0.5 as weights
dominate (OLMo-1B) and stays near 0.75 for the 135M model, whose temporaries weigh as much as its weights.
The anonymous-memory ratio says the same without the mapped file: ours keeps an fp32 model's weights in
the (reclaimable) page cache, the seed's deep copy makes them anonymous.
Time: both run the full teacher forward, and both backpropagate only down to the edited layer (nothing
below it needs a gradient); ours saves only the student's forward through the blocks below that layer.
Counting matmul FLOPs, the best possible s/step ratio is ~0.88 for layer 11 of 30 (smollm2) and ~0.98
for layer 1 of 16 (OLMo-1B) with teacher_cache_mb=0.

Noise: on a small shared machine timings swing by 10-30% (see the printed load averages); use --repeats
and more steps before trusting a ratio near its target. When other processes keep the cores busy, use
--threads 1: oversubscribed OpenMP threads can make every op 5-10x slower and swamp the difference being
measured. "cpu s/step" (process CPU time per step) is steadier when neighbours come and go, but is only
meaningful with --threads 1 (idle OpenMP threads spin on CPU).

    .venv/bin/python benchmarks/bench_repair.py [--steps 6] [--olmo-steps 3] [--no-olmo] [--threads N]
                                                [--repeats R] [--impls ours,ours-bf16] [--olmo-dir DIR]
                                                [--no-smollm2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

BATCH, SEQ_LEN, LR, WD, SEED = 2, 128, 1e-3, 0.01, 0
MODELS = {"smollm2-135m": "11:507:1229", "olmo-1b-shape": "1:1764:1710"}


def olmo_config():
    from transformers import OlmoConfig

    return OlmoConfig(  # allenai/OLMo-1B-0724-hf
        vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279, clip_qkv=None,
    )


def save_olmo(folder: str) -> None:
    """The OLMo-1B-shaped model with random fp32 weights (seeded), as a safetensors checkpoint in `folder`."""
    from transformers import OlmoForCausalLM

    torch.manual_seed(SEED)
    OlmoForCausalLM(olmo_config()).save_pretrained(folder)


def build(name: str, n_seq: int, dtype: str = "fp32", olmo_dir: str | None = None):
    """(model in eval mode with frozen params, [n_seq, SEQ_LEN] token ids); dtype fp32 or bf16 weights."""
    if name == "smollm2-135m":
        from superweight.io import corpora
        from superweight.io import models

        loaded = models.load(name, dtype=dtype)
        ids = corpora.tokenize(loaded.tokenizer, corpora.load_text("pydoc", "train"), n_seq * SEQ_LEN)
        return loaded.model, corpora.pack(ids, SEQ_LEN)
    from transformers import OlmoForCausalLM

    model = OlmoForCausalLM.from_pretrained(olmo_dir, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.eval().requires_grad_(False)
    ids = torch.randint(0, olmo_config().vocab_size, (n_seq, SEQ_LEN),
                        generator=torch.Generator().manual_seed(SEED))
    return model, ids


def run_ours(model, seqs, coord, steps, stamps, losses, cached=False):
    """cached=True: one batch of sequences repeated, so every step after the first reuses the cached teacher
    (the steady state of a multi-epoch recipe such as `fast`); otherwise the cache is off."""
    from superweight.core.coords import parse_coord
    from superweight.engine.config import FirstOrderConfig
    from superweight.progress import EachStep
    from superweight.engine.train import Track, train

    c = parse_coord(coord)
    if cached:
        seqs = seqs[:BATCH]
    # check_sequences=0: no held-out sequences, so both train on the same batches of all the sequences (and ours does not
    # spend time on held-out checks the seed's loop does not make).
    cfg = FirstOrderConfig(steps=steps, batch_size=BATCH, seq_len=SEQ_LEN, lr=LR, weight_decay=WD,
                           optimizer="adamw", schedule="constant", train_tokens=seqs.numel(),
                           teacher_cache_mb=1 << 20 if cached else 0, seed=SEED, check_sequences=0)

    def on_step(_step, loss):
        stamps.append((time.perf_counter(), time.process_time()))
        losses.append(loss)

    _, state = train(model, [c], [(c.layer, c.row)], seqs, cfg, Track(progress=EachStep(on_step)))
    return {"train_s_per_step_incl_warmup": state.s_per_step}


def run_seed(model, seqs, coord, steps, stamps, losses):
    from superweight.core.coords import parse_coord
    from superweight.engine.optimize import batch_indices

    c = parse_coord(coord)
    teacher = copy.deepcopy(model)  # intact copy
    student = model
    dp = student.model.layers[c.layer].mlp.down_proj
    with torch.no_grad():
        dp.weight[c.row, c.col] = 0.0
    d = torch.zeros(dp.weight.shape[1], requires_grad=True)

    def hook(_module, inp, out):
        out[..., c.row] += inp[0] @ d
        return out

    dp.register_forward_hook(hook)
    opt = torch.optim.AdamW([d], lr=LR, weight_decay=WD)
    for step in range(steps):
        ids = seqs[batch_indices(step, BATCH, seqs.shape[0], SEED)]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
        vocab = s_logits.shape[-1]
        loss = F.kl_div(F.log_softmax(s_logits.float(), -1).reshape(-1, vocab),
                        F.log_softmax(t_logits.float(), -1).reshape(-1, vocab),
                        log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        stamps.append((time.perf_counter(), time.process_time()))
    return {}


def status_mb() -> dict[str, float]:
    """RssAnon, RssFile, RssShmem, VmRSS and VmHWM of this process in MB (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024  # kB
    return out


def mapped_weights_mb() -> float:
    """Resident MB of this process's memory-mapped checkpoint files (*.safetensors), from /proc/self/smaps."""
    total, weights = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line: range, perms, ..., path
                weights = len(head) >= 6 and head[-1].endswith(".safetensors")
            elif weights and head and head[0] == "Rss:":
                total += int(head[1])
    return total / 1024


class MemorySampler:
    """Peak RssAnon and RssFile over the life of `with MemorySampler() as mem:`, sampled every `every` s by a
    daemon thread (torch's kernels release the GIL, so it keeps sampling while a step runs)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self.weights = every, {"RssAnon": 0.0, "RssFile": 0.0}, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        now = status_mb()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now[key])

    def sample_weights(self) -> None:
        self.weights = max(self.weights, mapped_weights_mb())
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def child(args) -> None:
    """One implementation on one model; prints one JSON line."""
    torch.set_num_threads(args.threads)
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        model, seqs = build(args.model, args.steps * BATCH, "bf16" if args.only == "ours-bf16" else "fp32",
                            args.olmo_dir)
        mem.sample_weights()
        now = status_mb()
        built = {"build_s": round(time.perf_counter() - t0, 1), "anon_after_build_mb": round(now["RssAnon"], 1),
                 "file_after_build_mb": round(now["RssFile"], 1), "peak_rss_build_mb": round(now["VmHWM"], 1)}
        stamps, losses = [], []
        start = (time.perf_counter(), time.process_time())
        fn = {"ours": run_ours, "seed": run_seed, "ours-bf16": run_ours,
              "ours-cached": lambda *a: run_ours(*a, cached=True)}[args.only]
        extra = fn(model, seqs, MODELS[args.model], args.steps, stamps, losses)
        mem.sample_weights()
    out = {"impl": args.only, "model": args.model, "steps": args.steps,
           "s_per_step": (stamps[-1][0] - stamps[0][0]) / (len(stamps) - 1),
           "cpu_s_per_step": (stamps[-1][1] - stamps[0][1]) / (len(stamps) - 1),
           "warmup_step_s": stamps[0][0] - start[0], "loss_step1": losses[0],
           "peak_rss_mb": status_mb()["VmHWM"], "peak_anon_mb": mem.peak["RssAnon"],
           "peak_file_mb": mem.peak["RssFile"], "mapped_weights_mb": mem.weights, **built, **extra}
    print(json.dumps(out), flush=True)


def spawn(impl: str, model: str, steps: int, threads: int, olmo_dir: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--only", impl, "--model", model,
           "--steps", str(steps), "--threads", str(threads)] + (["--olmo-dir", olmo_dir] if olmo_dir else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{impl}/{model} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


IMPLS = ("ours", "seed", "ours-cached", "ours-bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps on smollm2-135m (first is warm-up)")
    parser.add_argument("--olmo-steps", type=int, default=3, help="steps on the OLMo-1B-shaped model")
    parser.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=True,
                        help="run the embedded SmolLM2-135M")
    parser.add_argument("--olmo", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the OLMo-1B-shaped model (needs ~12 GB free RAM, a few minutes)")
    parser.add_argument("--olmo-dir", help="where the OLMo-1B-shaped checkpoint is (written there if absent); "
                                           "default: a temporary folder, removed at the end")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1,
                        help="subprocess pairs per model (alternating); best s/step and highest memory kept")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also time train() with bf16 weights (patch, loss and log-softmax stay fp32)")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated subset of {','.join(IMPLS)} (e.g. ours,ours-bf16: memory by dtype "
                             "without the seed's second copy)")
    parser.add_argument("--only", choices=[*IMPLS, "save-olmo"], help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2 or args.olmo_steps < 2:
        parser.error("need at least 2 steps (the first is an untimed warm-up)")
    if args.only == "save-olmo":
        return save_olmo(args.olmo_dir)
    if args.only:
        return child(args)
    impls = [i for i in args.impls.split(",") if i and (args.bf16 or i != "ours-bf16")]
    if not impls or set(impls) - set(IMPLS):
        parser.error(f"--impls: choose from {','.join(IMPLS)}")

    runs = ([("smollm2-135m", args.steps)] if args.smollm2 else []) + \
        ([("olmo-1b-shape", args.olmo_steps)] if args.olmo else [])
    if not runs:
        parser.error("--no-smollm2 and --no-olmo leave nothing to run")
    temp = None
    if args.olmo and not (args.olmo_dir and os.path.isfile(os.path.join(args.olmo_dir, "config.json"))):
        if not args.olmo_dir:
            args.olmo_dir = temp = tempfile.mkdtemp(prefix="bench-olmo-")
        print(f"saving the OLMo-1B-shaped checkpoint to {args.olmo_dir} (fp32 safetensors, ~4.7 GB)", flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--only", "save-olmo", "--olmo-dir",
                        args.olmo_dir], check=True)
    try:
        results = measure_all(args, runs, impls)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    summarize(args, runs, results)


def measure_all(args, runs, impls) -> dict:
    print("superweight repair benchmark: train() (one copy + shared prefix) vs the seed's two-copy loop")
    print(f"  torch={torch.__version__}  threads={args.threads}  batch={BATCH}x{SEQ_LEN} tokens  "
          f"AdamW lr={LR} wd={WD}  teacher_cache_mb=0  device=cpu fp32")
    print(f"  steps: {', '.join(f'{m}={s} (1 warm-up + {s - 1} timed)' for m, s in runs)}; "
          f"each (impl, model) in its own subprocess, {args.repeats} time(s), alternating")
    print(f"  load average at start: {os.getloadavg()[0]:.2f} (busy neighbours make s/step noisy)"
          f"{'; consider --threads 1' if args.threads > 1 and os.getloadavg()[0] > 0.5 else ''}")
    print("  memory: peak anon = largest RssAnon (own memory); mapped = resident checkpoint pages (*.safetensors) "
          "/ largest RssFile; peak RSS = VmHWM\n")
    print(f"{'model':<15}{'impl':<12}{'coord':<13}{'s/step':>8}{'cpu s/step':>11}{'warm-up s':>11}"
          f"{'peak anon MB':>14}{'mapped MB':>16}{'peak RSS MB':>13}{'loss@1':>12}")
    results = {}
    for model, steps in runs:
        for impl in [impl for _ in range(args.repeats) for impl in impls]:
            r = spawn(impl, model, steps, args.threads, args.olmo_dir)
            mapped = f"{r['mapped_weights_mb']:.0f}/{r['peak_file_mb']:.0f}"
            print(f"{model:<15}{impl:<12}{MODELS[model]:<13}{r['s_per_step']:>8.3f}"
                  f"{r['cpu_s_per_step']:>11.3f}{r['warmup_step_s']:>11.2f}{r['peak_anon_mb']:>14.0f}{mapped:>16}"
                  f"{r['peak_rss_mb']:>13.0f}{r['loss_step1']:>12.4e}", flush=True)
            old = results.get((model, impl))
            if old:  # over repeats keep the fastest timings and the largest memory figures
                r = {**r, **{k: min(r[k], old[k]) for k in ("s_per_step", "cpu_s_per_step")},
                     **{k: max(r[k], old[k]) for k in ("peak_rss_mb", "peak_anon_mb", "peak_file_mb",
                                                        "mapped_weights_mb")}}
            results[model, impl] = r
    return results


def summarize(args, runs, results) -> None:
    over = "; best s/step and highest memory over repeats" if args.repeats > 1 else ""
    print(f"\nratios ours/seed (lower is better{over})")
    for model, _ in runs:
        if (model, "ours") in results and (model, "seed") in results:
            o, s = results[model, "ours"], results[model, "seed"]
            rss, sps = o["peak_rss_mb"] / s["peak_rss_mb"], o["s_per_step"] / s["s_per_step"]
            cpu = o["cpu_s_per_step"] / s["cpu_s_per_step"]
            agree = abs(o["loss_step1"] - s["loss_step1"]) <= 1e-3 * abs(s["loss_step1"]) + 1e-12
            print(f"  {model:<15} peak RSS {rss:.3f} ({'OK' if rss <= 0.65 else 'MISS'} target <= 0.65; peak anon "
                  f"{o['peak_anon_mb'] / s['peak_anon_mb']:.3f})   s/step {sps:.3f} ({'OK' if sps <= 0.8 else 'MISS'} "
                  f"target <= 0.8; cpu s/step {cpu:.3f})   step-1 loss {'agrees' if agree else 'DIFFERS'}")
        if (model, "ours-cached") in results and (model, "seed") in results:
            c, s = results[model, "ours-cached"], results[model, "seed"]
            print(f"  {model:<15} with the teacher cached (steady state after the first epoch): s/step "
                  f"{c['s_per_step'] / s['s_per_step']:.3f}, peak RSS {c['peak_rss_mb'] / s['peak_rss_mb']:.3f}")
    if any((m, "ours-bf16") in results and (m, "ours") in results for m, _ in runs):
        print("\nbf16 weights vs fp32 (ours; patch, loss and log-softmax fp32): memory in MB, fp32 / bf16")
        for model, _ in runs:
            if (model, "ours-bf16") not in results or (model, "ours") not in results:
                continue
            o, b = results[model, "ours"], results[model, "ours-bf16"]
            sps = b["s_per_step"] / o["s_per_step"]
            target = f" ({'OK' if sps <= 0.45 else 'MISS'} target <= 0.45)" if model == "olmo-1b-shape" else ""
            print(f"  {model:<15} s/step {o['s_per_step']:.3f} / {b['s_per_step']:.3f} = {sps:.3f}{target}; "
                  f"peak anon {o['peak_anon_mb']:.0f} / {b['peak_anon_mb']:.0f} "
                  f"(= {b['peak_anon_mb'] / o['peak_anon_mb']:.3f}); mapped checkpoint "
                  f"{o['mapped_weights_mb']:.0f} / {b['mapped_weights_mb']:.0f}; peak RSS {o['peak_rss_mb']:.0f} / "
                  f"{b['peak_rss_mb']:.0f}; anon after load {o['anon_after_build_mb']:.0f} / "
                  f"{b['anon_after_build_mb']:.0f}; step-1 loss {o['loss_step1']:.4e} / {b['loss_step1']:.4e}")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
