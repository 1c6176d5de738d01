"""A patch as a standard PEFT LoRA adapter for the intact base checkpoint (`superweight apply --peft DIR`).

    tensors, config = adapter_tensors(model, load_patch("runs/x"))      # model: the intact checkpoint
    save_adapter("adapter/", tensors, config)                           # or write_peft(loaded, patch, "adapter/")
    # elsewhere, without superweight:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "adapter/")

Every edit superweight makes to a down-projection W [d_model, d_ff] is rank one per row: adding `d` to row r
is `ΔW = e_r dᵀ`, and ablating W[r, c] by a scale s is `ΔW = (s - 1) W[r, c] e_r e_cᵀ`. So all edits of one
row fold into one vector `a_r = d + Σ_c (s_c - 1) W[r, c] e_c`, and a layer whose rows r_1..r_k are touched
gets a LoRA of rank k: `lora_B = [e_r1 .. e_rk]` ([d_model, k]) and `lora_A = [a_r1; ..; a_rk]` ([k, d_ff]),
with `lora_alpha = r = k` so PEFT's scaling is 1. GPT-2's transposed Conv1D takes the same tensors with
`fan_in_fan_out = true`. PEFT itself is not needed to write the adapter (only to load it).

In a mixture of experts, a shared expert's down-projection is an nn.Linear and takes a LoRA like any other. A
routed expert's is a slice of the fused 3-D `experts.down_proj` parameter: PEFT (0.17 on; checked with 0.21)
targets such a parameter by name (`target_parameters`) with a LoRA of rank r per expert, whose factors
`_expert_lora` lays out, one expert's rows beside the others' zeros (docs/moe.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from superweight.core.arch import down_projection
from superweight.core.coords import site, split_row
from superweight.core.patching import PatchData, check_fits

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def row_vectors(model: nn.Module, patch: PatchData, ablation_only: bool = False) -> dict:
    """down-projection (coords.site: the layer, or (layer, expert)) -> row -> the vector added to that row of the
    intact W (the ablation folded in), fp32."""
    check_fits(model, patch)
    out: dict = {}

    def vec(layer: int, row: int, expert) -> torch.Tensor:
        key = site((layer, row, expert))
        return out.setdefault(key, {}).setdefault(row, torch.zeros(down_projection(model, layer, expert).d_ff))

    for c in patch.ablated:  # W[r, c] -> s W[r, c]: add (s - 1) W[r, c] at column c of row r
        w = down_projection(model, c.layer, c.expert).get(c.row, c.col).float().cpu()
        vec(c.layer, c.row, c.expert)[c.col] += (c.scale - 1.0) * w
    if not ablation_only:
        for r, d in zip(patch.rows, patch.vectors):
            vec(*split_row(r)).add_(d.detach().float().cpu())
    return out


def adapter_tensors(model: nn.Module, patch: PatchData, ablation_only: bool = False,
                    base: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA tensors (PEFT's saved key names) and adapter_config.json's content for `patch` on `model`."""
    tensors, ranks, transposed = {}, {}, False
    by_site = row_vectors(model, patch, ablation_only)
    routed: dict[int, dict[int, dict[int, torch.Tensor]]] = {}  # layer -> expert -> row -> vector
    for key, rows in sorted(by_site.items(), key=lambda kv: (kv[0], "") if isinstance(kv[0], int) else
                            (kv[0][0], str(kv[0][1]))):
        dp = down_projection(model, *(key if isinstance(key, tuple) else (key,)))
        if isinstance(dp.expert, int):
            routed.setdefault(dp.layer, {})[dp.expert] = rows
            continue
        order = sorted(rows)
        b = torch.zeros(dp.d_model, len(order))
        b[order, range(len(order))] = 1.0
        key = f"base_model.model.{dp.name}"
        tensors[f"{key}.lora_A.weight"] = torch.stack([rows[r] for r in order]).contiguous()
        tensors[f"{key}.lora_B.weight"] = b
        ranks[dp.name] = len(order)
        transposed |= dp.transposed
    rank = max([*ranks.values(), *(len(rows) for experts in routed.values() for rows in experts.values())])
    parameters = [_expert_lora(model, layer, experts, rank, tensors) for layer, experts in sorted(routed.items())]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "target_modules": sorted(ranks), "fan_in_fan_out": transposed, "inference_mode": True,
        # Scaling alpha / r must be 1 in every module, whatever its rank.
        "rank_pattern": {n: k for n, k in ranks.items() if k != rank},
        "alpha_pattern": {n: k for n, k in ranks.items() if k != rank},
        "init_lora_weights": True, "modules_to_save": None,
    }
    if parameters:  # only then, so that dense adapters stay as they were
        config["target_parameters"] = parameters
    return tensors, config


def _expert_lora(model: nn.Module, layer: int, experts: dict[int, dict[int, torch.Tensor]], rank: int,
                 tensors: dict[str, torch.Tensor]) -> str:
    """The LoRA of one layer's fused expert down-projections (PEFT's `target_parameters`, a ParamWrapper): rank
    `rank` per expert, lora_A [n_experts * rank, d_ff] with expert e's j-th row at e * rank + j, lora_B
    [d_model, rank * n_experts] with e_row at column j * n_experts + e (how PEFT reshapes them); unused slots
    stay zero. Adds the tensors; returns the parameter's name."""
    dp = down_projection(model, layer, next(iter(experts)))
    n = dp.weight.shape[0]
    a, b = torch.zeros(n * rank, dp.d_ff), torch.zeros(dp.d_model, rank * n)
    for e, rows in experts.items():
        for j, row in enumerate(sorted(rows)):
            a[e * rank + j] = rows[row]
            b[row, j * n + e] = 1.0
    name = next(name for name, m in model.named_modules() if m is dp.module)
    tensors[f"base_model.model.{name}.lora_A.weight"] = a
    tensors[f"base_model.model.{name}.lora_B.weight"] = b
    return f"{name}.down_proj"


def save_adapter(target: str | Path, tensors: dict[str, torch.Tensor], config: dict, about: dict | None = None) -> Path:
    """Write adapter_model.safetensors (with `about` as JSON metadata) and adapter_config.json as a new directory
    `target`: both are written into a temporary directory beside it, which is then renamed (never half an adapter)."""
    import shutil
    import tempfile

    from superweight.io.files import write_json

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt", "superweight": json.dumps(about or {}, sort_keys=True)})
        write_json(tmp / ADAPTER_CONFIG, dict(sorted(config.items())))
        tmp.chmod(0o755)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_peft(loaded, patch: PatchData, target: Path, ablation_only: bool = False) -> dict:
    """The adapter of `patch` for the intact model `loaded` (io.models.Loaded) as a new directory; its config."""
    from superweight.io.models import model_id
    from superweight.io.provenance import provenance

    tensors, config = adapter_tensors(loaded.model, patch, ablation_only, base=loaded.source)
    about = {"model": model_id(loaded), "source": loaded.source, "fingerprint": patch.config.fingerprint,
             "ablated": [str(c) for c in patch.ablated], "ablation_only": ablation_only,
             "rows": [] if ablation_only else [list(r) for r in patch.rows], "provenance": provenance()}
    save_adapter(target, tensors, config, about)
    return config
