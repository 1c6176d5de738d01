"""Find every MLP down-projection of a causal LM and address its weights as `W[row, col]`.

Coordinates always follow the `nn.Linear` convention: `row` is the residual-stream channel a weight writes
(0 <= row < d_model), `col` the intermediate neuron it reads (0 <= col < d_ff). GPT-2's `Conv1D` stores the
transpose (`[d_ff, d_model]`); `DownProj` translates so callers never see the difference.

    for dp in down_projections(model):
        print(dp.layer, dp.name, dp.d_model, dp.d_ff, dp.get(0, 0))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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


def family(model: nn.Module) -> str:
    """The architecture family of `model`, or an error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    name = ALIASES.get(model_type, model_type)
    if name not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedArchitectureError(
            f"unsupported architecture '{model_type}': superweight knows {supported}"
        )
    return name


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (whose outputs are the residual stream after each layer)."""
    layer_paths, _ = FAMILIES[family(model)]
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
    module: nn.Module
    block: nn.Module  # the decoder layer that holds it

    @property
    def transposed(self) -> bool:
        return _is_conv1d(self.module)

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
        w = self.weight
        return w.t() if self.transposed else w

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
                f"row {row} out of range for layer {self.layer} down-projection: "
                f"d_model is {self.d_model} (rows 0-{self.d_model - 1})"
            )
        if col is not None and not 0 <= col < self.d_ff:
            raise CoordinateError(
                f"column {col} out of range for layer {self.layer} down-projection: "
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


def down_projections(model: nn.Module) -> list[DownProj]:
    """Every down-projection of `model`, in layer order."""
    fam = family(model)
    layers = decoder_layers(model)
    _, rel = FAMILIES[fam]
    prefix = next(n for n, m in model.named_modules() if m is layers)
    out = []
    for i, block in enumerate(layers):
        module = block.get_submodule(rel)
        out.append(DownProj(layer=i, name=f"{prefix}.{i}.{rel}", module=module, block=block))
    return out


def down_projection(model: nn.Module, layer: int) -> DownProj:
    """The down-projection of one layer, with a clear error when the layer does not exist."""
    dps = down_projections(model)
    if not 0 <= layer < len(dps):
        raise CoordinateError(
            f"layer {layer} out of range: the model has {len(dps)} layers (0-{len(dps) - 1})"
        )
    return dps[layer]


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
    d_ff: int
    n_params: int
    down_proj_names: list[str]


def describe(model: nn.Module) -> ModelInfo:
    dps = down_projections(model)
    return ModelInfo(
        family=family(model),
        model_class=type(model).__name__,
        n_layers=len(dps),
        d_model=dps[0].d_model,
        d_ff=dps[0].d_ff,
        n_params=sum(p.numel() for p in model.parameters()),
        down_proj_names=[dp.name for dp in dps],
    )
