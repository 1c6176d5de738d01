"""Find every MLP down-projection of a causal LM and address its weights as `W[row, col]`.

Coordinates always follow the `nn.Linear` convention: `row` is the residual-stream channel a weight writes
(0 <= row < d_model), `col` the intermediate neuron it reads (0 <= col < d_ff). GPT-2's `Conv1D` stores the
transpose (`[d_ff, d_model]`); `DownProj` translates so callers never see the difference.

Mixture-of-experts models (core/moe.py) have one down-projection per expert: `DownProj.expert` is None for a
dense MLP, the expert's index for a routed expert (a slice of the fused 3-D `experts.down_proj`) and "shared"
for the shared expert. A hook on `dp.module` reads the projection's input with `dp.inputs(args)` whatever it is.

    for dp in down_projections(model):
        print(dp.layer, dp.expert, dp.name, dp.d_model, dp.d_ff, dp.get(0, 0))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from superweight.core import moe
from superweight.errors import CoordinateError, UnsupportedArchitectureError

# family -> (candidate paths of the decoder-layer list, down-projection path inside one layer).
# Several layer paths cover the bare CausalLM and the multimodal wrappers (Gemma 3).
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "llama": (("model.layers",), "mlp.down_proj"),
    "mistral": (("model.layers",), "mlp.down_proj"),
    "qwen2": (("model.layers",), "mlp.down_proj"),
    "qwen3": (("model.layers",), "mlp.down_proj"),
    "olmo": (("model.layers",), "mlp.down_proj"),
    "olmo2": (("model.layers",), "mlp.down_proj"),
    "gemma2": (("model.layers",), "mlp.down_proj"),
    "gemma3": (("model.layers", "model.language_model.layers"), "mlp.down_proj"),
    "phi3": (("model.layers",), "mlp.down_proj"),
    "gpt2": (("transformer.h",), "mlp.c_proj"),
    "gpt_neox": (("gpt_neox.layers",), "mlp.dense_4h_to_h"),
    "opt": (("model.decoder.layers",), "fc2"),
}
# config.model_type values that belong to a family above under another name.
ALIASES = {"gemma3_text": "gemma3"}
# Mixture-of-experts families (core/moe.py has where their experts are): decoder layers and dense down-projections
# where the Llama-like families have them.
MOE_FAMILIES = {name: FAMILIES["llama"] for name in moe.MOE_FAMILIES}


def _families() -> dict[str, tuple[tuple[str, ...], str]]:
    return {**FAMILIES, **MOE_FAMILIES}


def family(model: nn.Module) -> str:
    """The architecture family of `model`, or an error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    name = ALIASES.get(model_type, model_type)
    if name not in _families():
        supported = ", ".join(sorted(_families()))
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}': superweight knows {supported}"
        )
    return name


def is_moe(model: nn.Module) -> bool:
    return family(model) in MOE_FAMILIES


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (whose outputs are the residual stream after each layer)."""
    layer_paths, _ = _families()[family(model)]
    for path in layer_paths:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise UnsupportedArchitectureError(
        f"{type(model).__name__}: found none of {', '.join(layer_paths)}"
    )


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: weight [in_features, out_features], y = x @ W + b.
    return type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class DownProj:
    """One layer's down-projection, addressed as W[row=d_model, col=d_ff] whatever its storage."""

    layer: int
    name: str
    module: nn.Module  # what a forward hook goes on (for a routed expert: the fused experts module)
    block: nn.Module  # the decoder layer that holds it
    expert: int | str | None = None  # None: a dense MLP; an int: a routed expert; "shared": the shared expert

    @property
    def transposed(self) -> bool:
        return _is_conv1d(self.module)

    @property
    def where(self) -> str:
        """'layer 3', or 'layer 3 expert 5' / 'layer 3 shared expert' (for messages)."""
        if self.expert is None:
            return f"layer {self.layer}"
        return f"layer {self.layer} {'shared expert' if self.expert == moe.SHARED else f'expert {self.expert}'}"

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The [d_model, d_ff] view of a tensor stored like `weight` (the weight itself, a gradient of it)."""
        return tensor.t() if self.transposed else tensor

    def inputs(self, args: tuple) -> torch.Tensor:
        """This projection's input [..., d_ff], from the arguments of a forward hook on `module`."""
        return args[0]

    def outputs(self, x: torch.Tensor, out) -> torch.Tensor:
        """This projection's output [..., d_model] (x: `inputs(args)`, out: the hooked module's output)."""
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The stored weight the forward pass reads (transposed for Conv1D); prefer `get`/`set`/`row`.

        Usually the parameter itself. When accelerate offloads the module (`device_map` with "cpu" or "disk"
        entries), the parameter sits on the meta device between passes and the hook's `weights_map` holds
        the values; see `offloaded_weight`.
        """
        return offloaded_weight(self.module) if self.module.weight.is_meta else self.module.weight

    @property
    def matrix(self) -> torch.Tensor:
        """A [d_model, d_ff] view of the weight (no copy)."""
        return self.view(self.weight)

    @property
    def device(self) -> torch.device:
        """Where this layer computes (its own device, or the execution device of its offload hook)."""
        return execution_device(self.module)

    @property
    def d_model(self) -> int:
        return self.matrix.shape[0]

    @property
    def d_ff(self) -> int:
        return self.matrix.shape[1]

    def check(self, row: int, col: int | None = None) -> None:
        """Raise CoordinateError unless (row, col) lies inside this matrix."""
        if not 0 <= row < self.d_model:
            raise CoordinateError(
                f"row {row} out of range for {self.where} down-projection: "
                f"d_model is {self.d_model} (rows 0-{self.d_model - 1})"
            )
        if col is not None and not 0 <= col < self.d_ff:
            raise CoordinateError(
                f"column {col} out of range for {self.where} down-projection: "
                f"d_ff is {self.d_ff} (columns 0-{self.d_ff - 1})"
            )

    def get(self, row: int, col: int) -> torch.Tensor:
        """W[row, col] as a 0-d tensor copy (same dtype and device as the weight)."""
        return self.matrix[row, col].detach().clone()

    def set(self, row: int, col: int, value: torch.Tensor | float) -> None:
        with torch.no_grad():
            self.matrix[row, col] = value

    def row(self, row: int) -> torch.Tensor:
        """Row `row` (length d_ff) as a copy."""
        return self.matrix[row].detach().clone()

    def set_row(self, row: int, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.matrix[row].copy_(values)


@dataclass(frozen=True)
class ExpertDownProj(DownProj):
    """A routed expert's down-projection: slice `expert` of the fused 3-D `experts.down_proj` (core/moe.py).

    `module` is the experts module; its forward hook sees (hidden, top_k_index, top_k_weights), from which
    `inputs` computes the expert's routed input (moe.routed_input), and `outputs` what the expert adds to the
    block's output. Weight edits go through `matrix`, a view into the fused tensor."""

    @property
    def transposed(self) -> bool:  # [n_experts, d_ff, d_model] storage
        return bool(getattr(self.module, "is_transposed", False))

    @property
    def weight(self) -> torch.Tensor:
        """The fused [n_experts, ...] tensor that holds every expert of the layer; `matrix` is this one's slice."""
        return stored(self.module, "down_proj")

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.expert].t() if self.transposed else tensor[self.expert]

    def inputs(self, args: tuple) -> torch.Tensor:
        return moe.routed_input(self.module, args, self.expert, stored(self.module, "gate_up_proj"))

    def outputs(self, x: torch.Tensor, out) -> torch.Tensor:
        return F.linear(x, self.matrix.to(x.device, x.dtype))


def offloaded_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor an accelerate-offloaded module loads into `name` at each forward pass.

    The hook's `weights_map` reads disk-offloaded tensors afresh from the offload folder on every access, so an
    in-place edit there would be lost. The first access therefore keeps a RAM copy in the loader's
    `state_dict`, which accelerate reads first (`OffloadedWeightsLoader.__getitem__`): from then on reads and
    writes go to the one tensor the forward pass uses. CPU-offloaded tensors already live there.
    """
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is None:
        raise UnsupportedArchitectureError(f"{type(module).__name__}.{name} is on the meta device without an offload hook")
    loader, key = getattr(weights_map, "dataset", None), getattr(weights_map, "prefix", "") + name
    state = getattr(loader, "state_dict", None)
    if isinstance(state, dict):
        if key not in state:
            state[key] = weights_map[name].clone()
        return state[key]
    return weights_map[name]


def stored(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """`module.<name>` as the forward pass reads it: the tensor itself, or its offloaded copy (`offloaded_weight`)."""
    tensor = getattr(module, name)
    return offloaded_weight(module, name) if tensor is not None and tensor.is_meta else tensor


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its offload hook's execution device, else its first real tensor's."""
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device if not isinstance(hook_device, int) else f"cuda:{hook_device}")
    for t in module.parameters():
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the device of the input embeddings (works when layers are spread or offloaded)."""
    return execution_device(model.get_input_embeddings())


def _layer_projections(model: nn.Module, layers: nn.ModuleList, prefix: str, i: int) -> list[DownProj]:
    """The down-projections of layer i: its dense MLP's, or each routed expert's and the shared expert's."""
    fam, block = family(model), layers[i]
    layout = moe.MOE_FAMILIES.get(fam)
    experts = moe.submodule(block, layout and layout.experts)
    if experts is None:
        rel = _families()[fam][1]
        return [DownProj(layer=i, name=f"{prefix}.{i}.{rel}", module=block.get_submodule(rel), block=block)]
    name = f"{prefix}.{i}.{layout.experts}.down_proj"
    out: list[DownProj] = [ExpertDownProj(layer=i, name=f"{name}[{e}]", module=experts, block=block, expert=e)
                           for e in range(moe.n_experts(experts))]
    if layout.shared is not None:
        rel = f"{layout.shared}.down_proj"
        out.append(DownProj(layer=i, name=f"{prefix}.{i}.{rel}", module=block.get_submodule(rel), block=block,
                            expert=moe.SHARED))
    return out


def down_projections(model: nn.Module) -> list[DownProj]:
    """Every down-projection of `model`, in layer order (in an MoE layer: experts 0..n-1, then the shared one)."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return [dp for i in range(len(layers)) for dp in _layer_projections(model, layers, prefix, i)]


def down_projection(model: nn.Module, layer: int, expert: int | str | None = None) -> DownProj:
    """The down-projection of one layer (of one of its experts, in an MoE layer), with a clear error when it
    does not exist."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise CoordinateError(
            f"layer {layer} out of range: the model has {len(layers)} layers (0-{len(layers) - 1})"
        )
    prefix = next(n for n, m in model.named_modules() if m is layers)
    dps = _layer_projections(model, layers, prefix, layer)
    names = [dp.expert for dp in dps]
    if expert in names:
        return dps[names.index(expert)]
    if names == [None]:
        raise CoordinateError(f"layer {layer} has no experts (a dense MLP): address its weights as LAYER:ROW:COL, "
                              f"not with expert {expert}")
    routed = [e for e in names if isinstance(e, int)]
    choices = f"experts 0-{len(routed) - 1}" + (f" or {moe.SHARED}" if moe.SHARED in names else "")
    if expert is None:
        raise CoordinateError(f"layer {layer} is a mixture of experts: address its weights as LAYER:EXPERT:ROW:COL "
                              f"({choices})")
    if expert == moe.SHARED:
        raise CoordinateError(f"layer {layer} has no shared expert: it has {choices}")
    raise CoordinateError(f"expert {expert} out of range for layer {layer}: it has {choices}")


def moe_block(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module, nn.Module | None] | None:
    """(experts, router, shared expert or None) of an MoE layer; None for a dense layer or model."""
    layout = moe.MOE_FAMILIES.get(family(model))
    block = decoder_layers(model)[layer]
    experts = moe.submodule(block, layout and layout.experts)
    if experts is None:
        return None
    return experts, block.get_submodule(layout.router), moe.submodule(block, layout.shared)


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear layer inside the decoder blocks (attention and MLP; never the embeddings,
    norms or lm_head): what weight quantization touches. GPT-2's Conv1D counts (see `linear_matrix`)."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return [(f"{prefix}.{i}.{name}", m) for i, block in enumerate(layers) for name, m in block.named_modules()
            if isinstance(m, nn.Linear) or _is_conv1d(m)]


def linear_matrix(module: nn.Module) -> torch.Tensor:
    """The [out, in] view of a linear layer's stored weight (no copy; Conv1D stores [in, out])."""
    w = stored(module)
    return w.t() if _is_conv1d(module) else w


# family -> candidate paths of the norm applied before the unembedding (for the logit lens).
FINAL_NORMS = {
    "gpt2": ("transformer.ln_f",),
    "gpt_neox": ("gpt_neox.final_layer_norm",),
    "opt": ("model.decoder.final_layer_norm",),
    "gemma3": ("model.norm", "model.language_model.norm"),
}


def final_norm(model: nn.Module) -> nn.Module:
    """The last norm before the unembedding (`model.norm` for the Llama-like families)."""
    for path in FINAL_NORMS.get(family(model), ("model.norm",)):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise UnsupportedArchitectureError(f"cannot find the final norm of this {family(model)} model")


@dataclass(frozen=True)
class ModelInfo:
    family: str
    model_class: str
    n_layers: int
    d_model: int
    d_ff: int  # of the first down-projection (an expert's, in an MoE model)
    n_params: int
    down_proj_names: list[str]
    n_experts: int = 0  # routed experts per MoE layer (0: a dense model)


def describe(model: nn.Module) -> ModelInfo:
    dps = down_projections(model)
    return ModelInfo(
        family=family(model),
        model_class=type(model).__name__,
        n_layers=len(decoder_layers(model)),
        d_model=dps[0].d_model,
        d_ff=dps[0].d_ff,
        n_params=sum(p.numel() for p in model.parameters()),
        down_proj_names=[dp.name for dp in dps],
        n_experts=max((dp.expert + 1 for dp in dps if isinstance(dp.expert, int)), default=0),
    )
