#!/usr/bin/env bash
# One-GPU check for issues 12 and 28, under 9 minutes on one modern GPU (prepared on a CPU-only machine).
#   1. the tests that touch dtypes, devices, data parallelism, chunked scoring and the cost counter, with CUDA
#      visible (they pass without it too);
#   2. `superweight run` on the embedded model with --device cuda --dtype auto (bf16 where supported), then
#      benchmarks/bench_run.py on cuda: eval-pass equivalents per stage (with its parts, the second repair
#      apart) and run / plain-pass wall;
#   3. the OLMo-1B-shaped repair step, fp32 vs bf16 weights (benchmarks/bench_repair.py on cuda).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (numbers go to OUT_DIR/*.txt, default $OUT or /tmp/gpu_check)
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PY:-.venv/bin/python}
SW=${SW:-.venv/bin/superweight}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '-',
'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())" | tee "$OUT_DIR/device.txt"

echo "== 1. tests (about 2 min)"
timeout 240 "$PY" -m pytest -q tests/test_dtype_devices.py tests/test_distributed.py tests/test_intervene.py \
  tests/test_train.py tests/test_cost.py 2>&1 | tail -5 | tee "$OUT_DIR/tests.txt"
timeout 120 "$PY" -m pytest -q tests/test_analyze.py -k "standalone or subset or ranked_the_same" 2>&1 | tail -3 \
  | tee -a "$OUT_DIR/tests.txt"  # the account of repair and analyze on their own, the sweep subset, one cut once

echo "== 2. superweight run --device cuda --dtype auto on the embedded model (about 1-2 min)"
rm -rf "$OUT_DIR/run"
/usr/bin/time -v timeout 240 "$SW" run --device cuda --dtype auto --out "$OUT_DIR/run" \
  > "$OUT_DIR/run.txt" 2> "$OUT_DIR/run.err"
echo "rc $?"; grep -E "dtype auto|NLL-gap|PPL|Elapsed|Seconds" "$OUT_DIR/run.txt" "$OUT_DIR/run.err" | head -12
timeout 180 "$PY" benchmarks/bench_run.py --device cuda --dtype auto --json "$OUT_DIR/bench_run.json" 2>&1 \
  | tee "$OUT_DIR/bench_run.txt"

echo "== 3. OLMo-1B-shaped step, fp32 vs bf16 weights, on cuda (about 1 min)"
timeout 180 "$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/olmo_step.txt"
import time, torch
from transformers import OlmoConfig, OlmoForCausalLM
from superweight.core.coords import parse_coord
from superweight.engine.config import FirstOrderConfig
from superweight.progress import EachStep
from superweight.engine.train import Track, train
cfg = OlmoConfig(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                 tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279, clip_qkv=None)
c = parse_coord("1:1764:1710")
ids = torch.randint(0, cfg.vocab_size, (12, 128), generator=torch.Generator().manual_seed(0))
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    model = OlmoForCausalLM(cfg).to("cuda", dtype).eval().requires_grad_(False)
    rc = FirstOrderConfig(steps=6, batch_size=2, seq_len=128, lr=1e-3, schedule="constant", teacher_cache_mb=0,
                          train_tokens=ids.numel())
    stamps = []
    torch.cuda.reset_peak_memory_stats()
    train(model, [c], [(1, 1764)], ids, rc,
          Track(progress=EachStep(lambda s, l: (torch.cuda.synchronize(), stamps.append(time.perf_counter())))))
    print(f"olmo-1b-shape {str(dtype):15} s/step {(stamps[-1] - stamps[0]) / (len(stamps) - 1):.4f} "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    del model; torch.cuda.empty_cache()
EOF
echo "done: $OUT_DIR"
