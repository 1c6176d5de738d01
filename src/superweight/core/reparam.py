"""Change a model's parametrization without changing the function it computes: three symmetries.

    rescale_mlp(model, layer=11, factors=100.0)                 # every neuron: x_j * 100, W[:, j] / 100
    rescale_mlp(model, 11, torch.exp(torch.randn(d_ff)))          # per neuron (log-normal factors)
    rescale_residual(model, 10.0)                                 # the whole residual stream x 10
    move_norm_gain(model, torch.rand(d_model) + 0.5)              # every norm's gain x b, its readers' columns / b

1. `rescale_mlp`: neuron j of one MLP is scaled by a_j: the rows of the MLP's first projection that make x_j
are multiplied by a_j and column j of the down-projection is divided by it, so x_j -> a_j x_j and the
down-projection's output W x is unchanged (to float rounding). A super weight W[row, col] becomes W[row, col] / a_col
at the same coordinates, and every activation it reads a_col times larger. Results about the model (detection, a
repair's recovery, a sparse frontier) should not move; results about the parametrization (‖d‖, a fixed-lr
optimiser's path) do. `tests/test_reparam.py` and `benchmarks/bench_transfer.py` use it to check which is which.
Which MLPs can be rescaled this way:
- gated MLPs, down(act(gate x) * up x): linear in up_proj's output, so up_proj's rows carry a_j (any a_j != 0):
  llama, mistral, qwen2, qwen3, olmo, olmo2, gemma2, gemma3, and phi3 (the up half of its fused gate_up_proj);
- opt, down(relu(fc1 x)): ReLU is positively homogeneous, so fc1's rows (and bias) carry a_j for a_j > 0;
- not gpt2 or gpt_neox: GELU(a z) != a GELU(z), so no rescaling of the first projection preserves the function.

2. `rescale_residual`: the residual stream h -> c h (c > 0). In a pre-norm transformer every reader of h goes
through a norm, and RMSNorm(c h) = RMSNorm(h), LayerNorm(c h) = LayerNorm(h) (up to eps: exact when c^2 mean(h^2)
stays well above the norm's eps), so multiplying everything that writes into h by c leaves the logits alone: the
token embeddings (Gemma's x sqrt(d_model) comes after the lookup), learned positions (gpt2's wpe, opt's
embed_positions), Gemma 3's image projector, and each block's writes, weight and bias: o_proj and down_proj (llama,
mistral, qwen2, qwen3, olmo, phi3), attn.c_proj and mlp.c_proj (gpt2), attention.dense and mlp.dense_4h_to_h
(gpt_neox, parallel residual or not), out_proj and fc2 (pre-norm opt). gemma2 and gemma3 normalise each
sub-block's output before adding it, so the gains of post_attention_layernorm and post_feedforward_layernorm carry
c instead (Gemma's norm is x (1 + w): w -> c (1 + w) - 1). olmo2 has those post-norms and no pre-norms: its
attention and MLP read h itself, so q/k/v/gate/up_proj divide by c as well. Every down-projection is c times
larger at the same coordinates; detection, which ranks by ratios and KL, finds the same weights. Exists for every
family; refused for post-norm opt (opt-350m), opt with project_in/out and gpt2 with cross-attention.

3. `move_norm_gain`: a norm's gain g -> b g (b a scalar or one non-zero factor per channel) and the columns of
every linear that reads that norm's output / b: input_layernorm -> q/k/v (phi3's fused qkv_proj, gpt_neox's
query_key_value, gpt2's ln_1 -> c_attn, opt's self_attn_layer_norm), the pre-MLP norm -> the MLP's first
projections (post_attention_layernorm -> gate/up in llama-like families and gpt_neox's dense_h_to_4h,
pre_feedforward_layernorm in gemma2/3, gpt2's ln_2 -> c_fc, opt's final_layer_norm -> fc1), and the final norm ->
lm_head. Applied to all of them at once with the same b. A LayerNorm's bias is multiplied by b too; Gemma's gain
goes w -> b (1 + w) - 1. Exact up to rounding (no eps involved). Norms whose output goes straight into the residual
(gemma2/3's and olmo2's post-norms) and the q_norm/k_norm inside attention (qwen3, olmo2, gemma3) are left alone;
in olmo2 that leaves only the final norm. Not olmo: its LayerNorm has no gain.

Both whole-network symmetries untie tied input/output embeddings first (lm_head gets its own copy,
config.tie_word_embeddings = False), compute in fp32 and write back in each tensor's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from superweight.core.arch import decoder_layers, down_projection, family, final_norm, linear_matrix, stored
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


# family -> what writes into the residual stream inside a block: linears (weight and bias x c), or, for the
# families that normalise a sub-block's output before adding it, those post-norms (gain x c).
RESIDUAL_WRITES = {
    **{f: ("self_attn.o_proj", "mlp.down_proj") for f in ("llama", "mistral", "qwen2", "qwen3", "olmo", "phi3")},
    **{f: ("post_attention_layernorm", "post_feedforward_layernorm") for f in ("gemma2", "gemma3", "olmo2")},
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "opt": ("self_attn.out_proj", "fc2"),
}
POST_NORMS = {"gemma2", "gemma3", "olmo2"}
# OLMo 2 has no pre-norms: its attention and MLP read the residual stream itself, so their inputs divide by c.
RAW_READERS = {"olmo2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
# what else writes into the residual stream before the first block, beside the token embeddings (when present)
INPUT_WRITES = {
    "gpt2": ("transformer.wpe",),
    "opt": ("model.decoder.embed_positions",),
    "gemma3": ("model.multi_modal_projector",),  # Gemma3ForConditionalGeneration: image tokens' embeddings
}

# family -> {norm inside a block: the linears that read its output}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
NORM_READERS = {
    **{f: {"input_layernorm": _QKV, "post_attention_layernorm": _GATE_UP}
       for f in ("llama", "mistral", "qwen2", "qwen3", "olmo")},
    **{f: {"input_layernorm": _QKV, "pre_feedforward_layernorm": _GATE_UP} for f in ("gemma2", "gemma3")},
    "olmo2": {},  # no pre-norms: only the final norm is read by a linear (lm_head)
    "phi3": {"input_layernorm": ("self_attn.qkv_proj",), "post_attention_layernorm": ("mlp.gate_up_proj",)},
    "gpt2": {"ln_1": ("attn.c_attn",), "ln_2": ("mlp.c_fc",)},
    "gpt_neox": {"input_layernorm": ("attention.query_key_value",), "post_attention_layernorm": ("mlp.dense_h_to_4h",)},
    "opt": {"self_attn_layer_norm": _QKV, "final_layer_norm": ("fc1",)},
}

# norm class -> how its gain applies: "w" (w * x_hat, LayerNorm also + bias), "1+w" (Gemma: (1 + w) * x_hat),
# None (no gain: OLMo's LayerNorm). All of them are scale-invariant up to eps. Any other class is refused.
GAIN = {
    **{n: "w" for n in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Olmo2RMSNorm",
                        "Phi3RMSNorm", "LayerNorm")},
    "Gemma2RMSNorm": "1+w",
    "Gemma3RMSNorm": "1+w",
    "OlmoLayerNorm": None,
}


def _pre_norm_family(model: nn.Module) -> str:
    """The family, refusing the variants where the residual stream is not read through norms alone."""
    fam = family(model)
    cfg = model.config
    if fam == "opt":
        if not cfg.do_layer_norm_before or getattr(cfg, "_remove_final_layer_norm", False):
            raise UnsupportedArchitectureError(
                "this opt model normalises after its sub-blocks (do_layer_norm_before=False, as opt-350m) or has no "
                "final norm: its residual stream is not read through norms alone")
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            raise UnsupportedArchitectureError(
                "this opt model has project_in/project_out (word_embed_proj_dim != hidden_size): not supported")
    if fam == "gpt2" and getattr(cfg, "add_cross_attention", False):
        raise UnsupportedArchitectureError("gpt2 with cross-attention is not supported")
    return fam


def _gain(fam: str, norm: nn.Module) -> str | None:
    """"w", "1+w" or None (no gain), per `GAIN`; refuses a norm class it does not know."""
    name = type(norm).__name__
    if name not in GAIN:
        raise UnsupportedArchitectureError(
            f"{fam}: {name} is not a norm superweight knows ({', '.join(sorted(GAIN))}): refusing to guess its gain")
    return GAIN[name] if getattr(norm, "weight", None) is not None else None


def _reading_norms(model: nn.Module, fam: str) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(norm, the linears that read its output) for every such norm, the final norm (read by lm_head) last."""
    pairs = [(block.get_submodule(name), [block.get_submodule(p) for p in readers])
             for block in decoder_layers(model) for name, readers in NORM_READERS[fam].items()]
    return pairs + [(final_norm(model), [model.get_output_embeddings()])]


def _mul(t: torch.Tensor | None, s: torch.Tensor) -> None:
    """t *= s in fp32, written back in t's dtype (s broadcasts along the last dim)."""
    if t is not None:
        t.copy_((t.float() * s.to(t.device)).to(t.dtype))


def _scale_gain(norm: nn.Module, kind: str, s: torch.Tensor) -> None:
    """Multiply what the norm's gain applies by s: w -> s w (and a LayerNorm's bias), Gemma's 1 + w -> s (1 + w)."""
    w = stored(norm)
    if kind == "1+w":
        w.copy_((s.to(w.device) * (1 + w.float()) - 1).to(w.dtype))
    else:
        _mul(w, s)
    if getattr(norm, "bias", None) is not None:
        _mul(stored(norm, "bias"), s)


def untie_embeddings(model: nn.Module) -> None:
    """Give lm_head its own copy of tied input embeddings and mark the config untied (so nothing re-ties them)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out.weight is inp.weight:
        if inp.weight.is_meta:
            raise UnsupportedArchitectureError(
                "cannot untie offloaded tied embeddings: load the model without offloading")
        out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5 keeps the tied keys it found at init
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


@torch.no_grad()
def rescale_residual(model: nn.Module, c: float) -> None:
    """Scale the residual stream by c > 0 in place (see the module docstring). Undo it with
    `rescale_residual(model, 1 / c)`. Exact up to rounding and the norms' eps, which must stay small beside
    c^2 mean(h^2): a tiny c makes eps matter."""
    fam = _pre_norm_family(model)
    c = float(c)
    if not math.isfinite(c) or c <= 0:
        raise UsageError(f"the residual scale must be finite and positive, got {c}")
    blocks = decoder_layers(model)
    posts = [block.get_submodule(p) for block in blocks for p in RESIDUAL_WRITES[fam]] if fam in POST_NORMS else []
    for norm, _ in _reading_norms(model, fam):  # all checked before anything changes: norms superweight knows
        _gain(fam, norm)
    if any(_gain(fam, norm) is None for norm in posts):
        raise UnsupportedArchitectureError(f"{fam}'s post-norms have no gain to carry the scale")
    s = torch.tensor(c)
    untie_embeddings(model)
    _mul(stored(model.get_input_embeddings()), s)
    for path in INPUT_WRITES.get(fam, ()):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # a text-only Gemma 3
        for name, _ in module.named_parameters(recurse=False):
            _mul(stored(module, name), s)
    for norm in posts:
        _scale_gain(norm, _gain(fam, norm), s)
    for block in blocks:
        if fam not in POST_NORMS:
            for path in RESIDUAL_WRITES[fam]:
                module = block.get_submodule(path)
                _mul(stored(module), s)
                _mul(stored(module, "bias"), s)  # None when the linear has no bias
        for path in RAW_READERS.get(fam, ()):
            _mul(stored(block.get_submodule(path)), 1 / s)


@torch.no_grad()
def move_norm_gain(model: nn.Module, b: float | torch.Tensor) -> None:
    """Scale every norm that a linear reads (the pre-attention, pre-MLP and final norms) by b, a scalar or one
    non-zero factor per residual channel ([d_model]), and divide the columns of its readers by b, in place (see
    the module docstring). Undo it with `move_norm_gain(model, 1 / b)`."""
    fam = _pre_norm_family(model)
    pairs = _reading_norms(model, fam)
    kinds = [_gain(fam, norm) for norm, _ in pairs]
    if None in kinds:
        raise UnsupportedArchitectureError(f"{fam}'s LayerNorm has no gain: there is no gain to move")
    d_model = stored(pairs[0][0]).numel()
    s = torch.as_tensor(b, dtype=torch.float32).detach().cpu().flatten()
    if s.numel() not in (1, d_model):
        raise UsageError(f"need 1 or {d_model} gain factors, got {s.numel()}")
    if not torch.isfinite(s).all() or (s == 0).any():
        raise UsageError("gain factors must be finite and non-zero")
    untie_embeddings(model)
    for (norm, readers), kind in zip(pairs, kinds):
        _scale_gain(norm, kind, s)
        for reader in readers:
            _mul(linear_matrix(reader), 1 / s)  # [out, in]: s runs along the columns, the norm's channels
