"""Where a model runs and in which precision: `Placement` (the five options every command that loads a model
takes), `--dtype auto` and `--device-map` (accelerate's big-model dispatch).

    where = Placement(device="cpu", dtype="auto")          # checked here: dtype, device map, memory, offload
    loaded = io.models.load("smollm2-135m", where)
    dtype, why = choose_dtype("cpu")        # ("bf16", "CPU has native bf16 matmul (avx512_bf16)") or fp32
    kwargs = device_map_kwargs("auto", "0=70GiB,1=70GiB,cpu=200GiB", "offload/")
    model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=torch.bfloat16, **kwargs)

bf16 *weights* are the speed lever (a 1B model's repair step is ~2.7x faster on a CPU with avx512_bf16); the
patch, the loss and every log-softmax stay fp32 whatever the weights are. `auto` picks bf16 only where it is
both fast and faithful: docs/olmo1b.md has the measured drift (base / broken / patched PPL, KL, recovery).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch
from pydantic import Field

from superweight.errors import UsageError
from superweight.settings import Settings

# x86 flags of native bf16 matrix instructions; on Arm the `bf16` feature (FEAT_BF16, BFMMLA).
X86_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# On this project's CPU (avx512_bf16) the embedded model's NLL-gap recovery moved by 0.3 points with bf16
# weights (94.8% fp32, 95.1% bf16; docs/olmo1b.md), inside the 2-point bar for making bf16 the automatic choice.
CPU_BF16_FAITHFUL = True
# Pins what `auto` resolves to (fp32 or bf16), e.g. for reproducible CI on machines of either kind.
AUTO_ENV = "SUPERWEIGHT_AUTO_DTYPE"


def cpu_bf16_flag(cpuinfo: str | None = None) -> str | None:
    """The CPU flag that gives native bf16 matmul (avx512_bf16, amx_bf16, or Arm's bf16), or None."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in {"flags", "features"}:
            flags.update(value.split())
    for flag in X86_BF16_FLAGS + ("bf16",):
        if flag in flags:
            return flag
    return None


def choose_dtype(device: str, cpuinfo: str | None = None) -> tuple[str, str]:
    """(dtype, reason) for `--dtype auto` on `device` (cpu, cuda[:N], mps, or a device map's devices)."""
    pinned = os.environ.get(AUTO_ENV, "").strip()
    if pinned:
        if pinned not in {"fp32", "bf16", "fp16"}:
            raise UsageError(f"{AUTO_ENV}={pinned}: use fp32, bf16 or fp16")
        return pinned, f"pinned by {AUTO_ENV}"
    if "cuda" in device:
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", f"CUDA device {torch.cuda.get_device_name()} supports bf16"
        return "fp32", "this CUDA device has no bf16 support"
    if device.startswith("mps"):
        return "fp32", "MPS: bf16 matmul is not reliably faster there"
    flag = cpu_bf16_flag(cpuinfo)
    if flag is None:
        machine = platform.machine() or "this CPU"
        return "fp32", f"{machine} CPU without native bf16 matmul (no {', '.join(X86_BF16_FLAGS)} or Arm bf16 flag)"
    if not CPU_BF16_FAITHFUL:
        return "fp32", f"CPU has {flag}, but bf16 moved recovery by more than 2 points (docs/olmo1b.md)"
    return "bf16", f"CPU has native bf16 matmul ({flag})"


def emulated_bf16(dtype: str, device: str, cpuinfo: str | None = None) -> str | None:
    """A one-line warning when bf16 weights will run on a CPU without native bf16 matmul (given as --dtype bf16,
    or `auto` pinned by SUPERWEIGHT_AUTO_DTYPE; `auto` alone picks fp32 there), else None."""
    if dtype != "bf16" or device != "cpu" or cpu_bf16_flag(cpuinfo) is not None:
        return None
    return (f"bf16 on this CPU is emulated (no {', '.join(X86_BF16_FLAGS)} or Arm bf16 flag): expect it to run "
            "several times slower than fp32; --dtype fp32 is faster here")


DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")


class Placement(Settings):
    """Where a model loads and in which precision (`--device`, `--dtype`, `--device-map`, `--max-memory`,
    `--offload-folder`); the checks that need no model run when it is made."""

    device: str = Field("cpu", description="cpu, cuda, cuda:N, mps or auto (ignored with device_map)")
    dtype: str = Field("auto", description="auto (choose_dtype), fp32, bf16 or fp16")
    device_map: str | None = Field(None, description="auto, balanced, or a JSON map {module: device} (a string or "
                                                     "a file): accelerate spreads the model over devices")
    max_memory: str | None = Field(None, description="with device_map: memory per device, e.g. 0=20GiB,cpu=60GiB")
    offload_folder: str | None = Field(None, description="with device_map: folder for disk-offloaded weights")

    def model_post_init(self, _ctx) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise UsageError(f"unknown dtype '{self.dtype}': use {', '.join(DTYPE_NAMES)}")
        check_device_map(self.device_map, self.max_memory, self.offload_folder)

    def kwargs(self) -> dict:
        """`from_pretrained` keyword arguments for the device map (empty without one); makes the offload folder."""
        return device_map_kwargs(self.device_map, self.max_memory, self.offload_folder)

    def where(self) -> str:
        return f"device map {self.device_map}" if self.device_map else self.device


def parse_max_memory(text: str | None) -> dict | None:
    """`0=70GiB,1=70GiB,cpu=200GiB` (or a JSON object) -> {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}."""
    if not text:
        return None
    try:
        raw = json.loads(text) if text.lstrip().startswith("{") else dict(
            part.split("=", 1) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"invalid --max-memory '{text}': expected DEVICE=SIZE,..., e.g. 0=20GiB,cpu=60GiB") from None
    out: dict = {}
    for key, value in raw.items():
        key = str(key).strip()
        if not (key.isdigit() or key in {"cpu", "disk", "mps"}):
            raise UsageError(f"invalid --max-memory device '{key}': use GPU numbers, cpu or disk")
        out[int(key) if key.isdigit() else key] = str(value).strip()
    return out


def device_map_kwargs(device_map: str | None, max_memory: str | None = None,
                      offload_folder: str | None = None) -> dict:
    """`from_pretrained` keyword arguments for `--device-map` (empty when none is given).

    `auto` and `balanced` let accelerate fill the GPUs, then the CPU, then the disk (within `max_memory`);
    a JSON object names a device per module, e.g. '{"model.embed_tokens": 0, "model.layers.0": 0, ...,
    "model.layers.15": "disk", "model.norm": "cpu", "lm_head": "cpu"}'. Disk entries need `offload_folder`.
    """
    mapping = check_device_map(device_map, max_memory, offload_folder)
    if mapping is None:
        return {}
    kwargs = {"device_map": mapping}
    if max_memory:
        kwargs["max_memory"] = parse_max_memory(max_memory)
    if offload_folder:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def check_device_map(device_map: str | None, max_memory: str | None = None,
                     offload_folder: str | None = None) -> str | dict | None:
    """The device map (a name or a {module: device} object), checked with its companions; None without one."""
    if device_map is None:
        if max_memory or offload_folder:
            raise UsageError("--max-memory and --offload-folder need --device-map (auto, balanced or a JSON map)")
        return None
    parse_max_memory(max_memory)
    if device_map in {"auto", "balanced", "balanced_low_0", "sequential"}:
        return device_map
    source = Path(device_map).read_text(encoding="utf-8") if Path(device_map).is_file() else device_map
    try:
        mapping = json.loads(source)
    except ValueError:
        raise UsageError(f"invalid --device-map '{device_map}': use auto, balanced, a JSON object or a "
                         "JSON file of {module: device}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError("--device-map JSON must be a non-empty object {module name: device}")
    if "disk" in mapping.values() and not offload_folder:
        raise UsageError("--device-map puts modules on the disk: give --offload-folder DIR")
    return mapping


def map_kind(mapping: str | dict) -> str:
    """The device kind `--dtype auto` decides for: cuda when any GPU is in (or, for auto, available to) the map."""
    if isinstance(mapping, dict):
        gpu = any(isinstance(v, int) or str(v).startswith("cuda") for v in mapping.values())
        return "cuda" if gpu and torch.cuda.is_available() else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
