"""Rescale one MLP without changing the function the model computes: the same model, another parametrization.

    rescale_mlp(model, layer=11, factors=100.0)                 # every neuron: x_j * 100, W[:, j] / 100
    rescale_mlp(model, 11, torch.exp(torch.randn(d_ff)))          # per neuron (log-normal factors)

Neuron j of the MLP is scaled by a_j: the rows of the MLP's first projection that make x_j are multiplied by
a_j and column j of the down-projection is divided by it, so x_j -> a_j x_j and the down-projection's output
W x is unchanged (to float rounding). A super weight W[row, col] becomes W[row, col] / a_col at the same
coordinates, and every activation it reads a_col times larger. Results about the model (detection, a repair's
recovery, a sparse frontier) should not move; results about the parametrization (‖d‖, a fixed-lr optimiser's
path) do. `tests/test_reparam.py` and `benchmarks/bench_transfer.py` use it to check which is which.

Which MLPs can be rescaled this way:
- gated MLPs, down(act(gate x) * up x): linear in up_proj's output, so up_proj's rows carry a_j (any a_j != 0):
  llama, mistral, qwen2, qwen3, olmo, olmo2, gemma2, gemma3, and phi3 (the up half of its fused gate_up_proj);
- opt, down(relu(fc1 x)): ReLU is positively homogeneous, so fc1's rows (and bias) carry a_j for a_j > 0;
- not gpt2 or gpt_neox: GELU(a z) != a GELU(z), so no rescaling of the first projection preserves the function.
"""

from __future__ import annotations

import torch
from torch import nn

from superweight.core.arch import down_projection, family, stored
from superweight.errors import UnsupportedArchitectureError, UsageError

# family -> (path of the MLP's first projection inside a block, offset of x's rows in its output)
# (phi3 fuses gate and up into one [2 d_ff, d_model] matrix: gate first, then up).
FIRST_PROJECTION = {
    **{f: "mlp.up_proj" for f in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma2", "gemma3")},
    "phi3": "mlp.gate_up_proj",
    "opt": "fc1",
}
POSITIVE_ONLY = {"opt"}  # ReLU(a z) = a ReLU(z) only for a > 0
CANNOT = {"gpt2": "GELU", "gpt_neox": "GELU"}


@torch.no_grad()
def rescale_mlp(model: nn.Module, layer: int, factors: float | torch.Tensor) -> torch.Tensor:
    """Scale neuron j of layer `layer`'s MLP by factors[j] (a float scales all), in place; returns the factors
    used ([d_ff], fp32). Undo it with `rescale_mlp(model, layer, 1 / factors)`."""
    fam = family(model)
    if fam in CANNOT:
        raise UnsupportedArchitectureError(
            f"{fam}'s MLP applies {CANNOT[fam]} to its first projection, which is not linear: no rescaling of "
            "its neurons preserves the function")
    dp = down_projection(model, layer)
    a = torch.as_tensor(factors, dtype=torch.float32).flatten()
    a = a.expand(dp.d_ff).clone() if a.numel() == 1 else a
    if a.numel() != dp.d_ff:
        raise UsageError(f"need 1 or {dp.d_ff} factors for layer {layer}, got {a.numel()}")
    if not torch.isfinite(a).all() or (a == 0).any():
        raise UsageError("rescaling factors must be finite and non-zero")
    if fam in POSITIVE_ONLY and (a <= 0).any():
        raise UsageError(f"{fam}'s ReLU MLP can only be rescaled by positive factors")
    first = dp.block.get_submodule(FIRST_PROJECTION[fam])
    offset = dp.d_ff if fam == "phi3" else 0
    rows = slice(offset, offset + dp.d_ff)
    w = stored(first)  # the offloaded copy when accelerate offloads the layer (--device-map)
    w[rows] = (w[rows].float() * a[:, None].to(w.device)).to(w.dtype)
    if getattr(first, "bias", None) is not None:
        b = first.bias
        b[rows] = (b[rows].float() * a.to(b.device)).to(b.dtype)
    m = dp.matrix  # [d_model, d_ff] view, whatever the storage
    m.copy_((m.float() / a[None, :].to(m.device)).to(m.dtype))
    return a


@torch.no_grad()
def neuron_balance(model: nn.Module, layer: int) -> torch.Tensor:
    """n_j = sqrt(‖first-projection row j‖ / ‖down-projection column j‖) per neuron of `layer` ([d_ff], fp32).

    `rescale_mlp` by a_j turns n_j into a_j n_j, so dividing by n_j gives every parametrization of the same
    function the same "balanced" one (‖row j‖ = ‖column j‖, the point weight decay drives training to):
    `rescale_mlp(model, layer, 1 / neuron_balance(model, layer))` balances the MLP in place."""
    fam = family(model)
    if fam in CANNOT:
        raise UnsupportedArchitectureError(f"{fam}'s {CANNOT[fam]} MLP has no function-preserving neuron scale")
    dp = down_projection(model, layer)
    offset = dp.d_ff if fam == "phi3" else 0
    first = stored(dp.block.get_submodule(FIRST_PROJECTION[fam]))[offset : offset + dp.d_ff].float()
    down = dp.matrix.float().norm(dim=0)
    return (first.norm(dim=1) / down.clamp_min(1e-30)).sqrt().cpu()
