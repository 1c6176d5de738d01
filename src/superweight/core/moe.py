"""Mixture-of-experts blocks as transformers 5.x builds them: where the experts are, what one expert reads, routing.

transformers 5 stores the routed experts of qwen2_moe, qwen3_moe, olmoe and mixtral fused, with no module per
expert: one module `mlp.experts` holds `gate_up_proj` [n_experts, 2 * d_ff, d_model] and `down_proj`
[n_experts, d_model, d_ff] (3-D nn.Parameters, each expert's slice in the nn.Linear [out, in] convention), and
the block calls it as `experts(hidden [T, d_model], top_k_index [T, k], top_k_weights [T, k])`. The router
`mlp.gate` returns (logits [T, n_experts], top-k weights, top-k indices). Qwen2-MoE adds a shared expert: an
ordinary MLP (`mlp.shared_expert`, nn.Linear projections) on every token, scaled by sigmoid(mlp.shared_expert_gate).
Qwen2/3-MoE may keep some layers dense (`mlp_only_layers`, `decoder_sparse_step`): those have `mlp.down_proj`.
docs/moe.md has the layouts and the commands for real models.

An expert's down-projection reads, in superweight's terms, its *routed input*: at each token the router sends
to it, the expert's intermediate activation times the routing weight, and zero at every other token. The MoE
block's output is then the sum over experts of routed input @ W_e^T (plus the shared expert), so a weight's
contribution |W_e[r, c] * x[c]|, a patch's write x @ d and the scans work on an expert exactly as on a dense MLP:

    x = routed_input(experts, (hidden, top_k_index, top_k_weights), expert=3)   # [T, d_ff]
    logits, weights, index = masked_routing(router, logits, drop=[3])           # the router without expert 3
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from superweight.core.coords import SHARED  # noqa: F401 (how coordinates name the shared expert: LAYER:shared:ROW:COL)
from superweight.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class MoeLayout:
    """Paths inside one decoder layer."""

    experts: str = "mlp.experts"  # the fused experts module (down_proj, gate_up_proj)
    router: str = "mlp.gate"  # returns (logits, top-k weights, top-k indices)
    shared: str | None = None  # the shared expert MLP, if any (its down-projection is `<shared>.down_proj`)


# model_type -> layout. The decoder-layer list and the dense layers' down-projection are arch.FAMILIES' llama ones.
MOE_FAMILIES: dict[str, MoeLayout] = {
    "qwen2_moe": MoeLayout(shared="mlp.shared_expert"),
    "qwen3_moe": MoeLayout(),
    "olmoe": MoeLayout(),
    "mixtral": MoeLayout(),
    # The same blocks in other families (checked on tiny models: tests/test_moe.py).
    "flex_olmo": MoeLayout(),
    "minimax": MoeLayout(),
    "qwen3_next": MoeLayout(shared="mlp.shared_expert"),
    "qwen3_5_moe_text": MoeLayout(shared="mlp.shared_expert"),
}


def submodule(block: nn.Module, path: str | None) -> nn.Module | None:
    """`block.<path>`, or None when the layer has no such module (a dense layer of an MoE model)."""
    if path is None:
        return None
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def n_experts(experts: nn.Module) -> int:
    return int(experts.down_proj.shape[0])


def _check_storage(experts: nn.Module) -> None:
    """Refuse the fused layouts that `routed_input` does not reproduce (interleaved gate/up, biases, no gate)."""
    if (not hasattr(experts, "gate_up_proj") or getattr(experts, "has_bias", False)
            or not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True)):
        raise UnsupportedArchitectureError(
            f"{type(experts).__name__} stores its experts in a layout superweight does not read (it needs a "
            "concatenated gate_up_proj without biases)")


def routed_input(experts: nn.Module, args: tuple, expert: int, gate_up: torch.Tensor) -> torch.Tensor:
    """Expert `expert`'s down-projection input [T, d_ff] from the experts module's call arguments (hidden
    [T, d_model], top_k_index [T, k], top_k_weights [T, k]): act(gate) * up, times the routing weight, at each
    token routed to it; zero elsewhere. `gate_up`: the fused gate_up_proj as the forward pass reads it (arch.stored).
    Computed in the hidden states' dtype, as the experts module does."""
    if len(args) < 3:
        raise UnsupportedArchitectureError(
            f"{type(experts).__name__} is called without positional (hidden, top_k_index, top_k_weights)")
    _check_storage(experts)
    hidden, index, weights = args[:3]
    gate_up = gate_up[expert]
    if getattr(experts, "is_transposed", False):  # [d_model, 2 d_ff]
        gate_up = gate_up.t()
    d_ff = gate_up.shape[0] // 2
    x = hidden.new_zeros(hidden.shape[0], d_ff)
    tokens, slot = (index == expert).nonzero(as_tuple=True)
    if tokens.numel():
        gate, up = F.linear(hidden[tokens], gate_up.to(hidden.device)).chunk(2, dim=-1)
        act = experts.act_fn(gate) * up
        x = x.index_put((tokens,), (act * weights[tokens, slot, None].to(act.dtype)).to(x.dtype))
    return x


def _renormalizes(router: nn.Module) -> bool:
    # Qwen-MoE and OLMoE say so in norm_topk_prob; Mixtral's router always renormalises and has no such field.
    return bool(getattr(router, "norm_topk_prob", True))


def masked_routing(router: nn.Module, logits: torch.Tensor, drop: list[int], like: tuple | None = None) -> tuple:
    """The router's output with the experts in `drop` masked out (logit -inf): softmax over the rest, top-k,
    renormalised when the router renormalises. `like`: the router's own output, whose dtypes are kept."""
    logits = logits.clone()
    if drop:
        logits[..., drop] = float("-inf")
    probs = torch.softmax(logits.float(), dim=-1)
    top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
    if _renormalizes(router):
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    if like is not None:
        top_value = top_value.to(like[1].dtype)
    return logits, top_value, top_index


def check_routing(router: nn.Module, out) -> None:
    """Refuse a router whose output `out` (logits, weights, indices) `masked_routing` does not reproduce."""
    if not isinstance(out, tuple) or len(out) != 3 or not hasattr(router, "top_k"):
        raise UnsupportedArchitectureError(f"{type(router).__name__} does not return (logits, weights, indices)")
    _, value, index = masked_routing(router, out[0], [], out)
    if not (torch.equal(index, out[2]) and torch.allclose(value.float(), out[1].float(), atol=1e-3)):
        raise UnsupportedArchitectureError(
            f"{type(router).__name__} routes in a way superweight does not reproduce (softmax, top-k, optional "
            "renormalisation): cannot prune an expert by masking its router logit")


@torch.no_grad()
def check_router(router: nn.Module) -> None:
    """`check_routing` on a random probe, before any pass (skipped while accelerate keeps the weight on the meta
    device: the pruning hook checks every real output anyway)."""
    weight = getattr(router, "weight", None)
    if weight is None or weight.is_meta:
        return
    gen = torch.Generator().manual_seed(0)
    check_routing(router, router(torch.randn(16, weight.shape[1], generator=gen).to(weight.device, weight.dtype)))
