"""Tiny, offline, deterministic causal LMs and a tokenizer for tests.

Every family that `superweight.arch.FAMILIES` supports has a builder here (and every mixture-of-experts family
of `arch.MOE_FAMILIES` one in MOE_FAMILIES: N_EXPERTS experts of d_ff D_FF, top-TOP_K routing, and for Qwen2-MoE
a shared expert of d_ff SHARED_FF). The models are randomly
initialised from a seed, fp32 and in eval mode, with distinct sizes everywhere so that a transposed or
swapped dimension cannot go unnoticed:

    D_MODEL = 32 (residual width, rows of a down-projection)
    D_FF    = 64 (intermediate width, columns of a down-projection)
    N_LAYERS = 2, 4 attention heads of size 8 (2 key/value heads where the family has GQA)
    VOCAB   = 512 (>= the tiny tokenizer's vocabulary)

    from tiny import FAMILIES, tiny_model, tiny_tokenizer, save_tiny_model_dir
    model = tiny_model("gpt2", seed=1, num_hidden_layers=3)  # overrides go to the config class
    tok = tiny_tokenizer()
    save_tiny_model_dir(tmp_path / "m", family="llama")  # then superweight.models.load(str(tmp_path / "m"))

Nothing here touches the network.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch

D_MODEL = 32
D_FF = 64
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = D_MODEL // N_HEADS
VOCAB = 512
MAX_POS = 512
TOKENIZER_VOCAB = 384  # target size of the trained BPE (256 bytes + merges + special tokens)
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def _build(model_cls_name: str, config_cls_name: str, defaults: dict, seed: int, overrides: dict):
    import transformers

    config_cls = getattr(transformers, config_cls_name)
    model_cls = getattr(transformers, model_cls_name)
    config = config_cls(**{**defaults, **overrides})
    # Eager attention: the reference implementation, identical across torch builds, and the one Gemma 2
    # recommends (soft-capping).
    config._attn_implementation = "eager"
    # Seed a private RNG stream so that building a model never disturbs the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model = model.float().eval()
    model.requires_grad_(False)
    return model


# Settings shared by the Llama-like families (field names differ for gpt2 / gpt_neox / opt below).
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=D_MODEL,
    intermediate_size=D_FF,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=N_HEADS,
    num_key_value_heads=N_KV_HEADS,
    max_position_embeddings=MAX_POS,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)


def _llama(seed: int = 0, **overrides):
    return _build("LlamaForCausalLM", "LlamaConfig", dict(_LLAMA_LIKE), seed, overrides)


def _mistral(seed: int = 0, **overrides):
    return _build("MistralForCausalLM", "MistralConfig", dict(_LLAMA_LIKE, head_dim=HEAD_DIM), seed, overrides)


def _qwen2(seed: int = 0, **overrides):
    return _build("Qwen2ForCausalLM", "Qwen2Config", dict(_LLAMA_LIKE), seed, overrides)


def _qwen3(seed: int = 0, **overrides):
    return _build("Qwen3ForCausalLM", "Qwen3Config", dict(_LLAMA_LIKE, head_dim=HEAD_DIM), seed, overrides)


def _olmo(seed: int = 0, **overrides):
    return _build("OlmoForCausalLM", "OlmoConfig", dict(_LLAMA_LIKE), seed, overrides)


def _olmo2(seed: int = 0, **overrides):
    return _build("Olmo2ForCausalLM", "Olmo2Config", dict(_LLAMA_LIKE), seed, overrides)


def _gemma2(seed: int = 0, **overrides):
    defaults = dict(_LLAMA_LIKE, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=16)
    return _build("Gemma2ForCausalLM", "Gemma2Config", defaults, seed, overrides)


def _gemma3(seed: int = 0, **overrides):
    defaults = dict(_LLAMA_LIKE, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=16)
    return _build("Gemma3ForCausalLM", "Gemma3TextConfig", defaults, seed, overrides)


def _phi3(seed: int = 0, **overrides):
    return _build("Phi3ForCausalLM", "Phi3Config", dict(_LLAMA_LIKE), seed, overrides)


def _gpt2(seed: int = 0, **overrides):
    defaults = dict(
        vocab_size=VOCAB, n_embd=D_MODEL, n_inner=D_FF, n_layer=N_LAYERS, n_head=N_HEADS, n_positions=MAX_POS,
        bos_token_id=0, eos_token_id=0,
    )
    return _build("GPT2LMHeadModel", "GPT2Config", defaults, seed, overrides)


def _gpt_neox(seed: int = 0, **overrides):
    defaults = dict(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FF, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, max_position_embeddings=MAX_POS, bos_token_id=0, eos_token_id=0,
        pad_token_id=1,
    )
    return _build("GPTNeoXForCausalLM", "GPTNeoXConfig", defaults, seed, overrides)


def _opt(seed: int = 0, **overrides):
    defaults = dict(
        vocab_size=VOCAB, hidden_size=D_MODEL, ffn_dim=D_FF, word_embed_proj_dim=D_MODEL,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, max_position_embeddings=MAX_POS,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    return _build("OPTForCausalLM", "OPTConfig", defaults, seed, overrides)


FAMILIES: dict[str, Callable[..., torch.nn.Module]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "olmo": _olmo,
    "olmo2": _olmo2,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
}

N_EXPERTS = 4
TOP_K = 2
SHARED_FF = 48  # Qwen2-MoE's shared expert: another width, so it cannot pass for a routed one


def _moe(model_cls_name: str, config_cls_name: str, full_attention: bool = False, **moe_settings):
    def build(seed: int = 0, **overrides):
        defaults = dict(_LLAMA_LIKE, num_experts_per_tok=TOP_K, **moe_settings)
        if full_attention:  # no linear-attention layers: their reference kernels take seconds on a CPU
            defaults["layer_types"] = ["full_attention"] * overrides.get("num_hidden_layers", N_LAYERS)
        return _build(model_cls_name, config_cls_name, defaults, seed, overrides)

    return build


# Qwen3-MoE renormalises the top-k weights (as Qwen3-30B-A3B does); Qwen2-MoE and OLMoE do not; Mixtral always does.
MOE_FAMILIES: dict[str, Callable[..., torch.nn.Module]] = {
    "qwen2_moe": _moe("Qwen2MoeForCausalLM", "Qwen2MoeConfig", num_experts=N_EXPERTS, moe_intermediate_size=D_FF,
                      shared_expert_intermediate_size=SHARED_FF),
    "qwen3_moe": _moe("Qwen3MoeForCausalLM", "Qwen3MoeConfig", num_experts=N_EXPERTS, moe_intermediate_size=D_FF,
                      head_dim=HEAD_DIM, norm_topk_prob=True),
    "olmoe": _moe("OlmoeForCausalLM", "OlmoeConfig", num_experts=N_EXPERTS),
    "mixtral": _moe("MixtralForCausalLM", "MixtralConfig", num_local_experts=N_EXPERTS, head_dim=HEAD_DIM),
    "flex_olmo": _moe("FlexOlmoForCausalLM", "FlexOlmoConfig", num_experts=N_EXPERTS),
    "minimax": _moe("MiniMaxForCausalLM", "MiniMaxConfig", num_local_experts=N_EXPERTS, head_dim=HEAD_DIM),
    "qwen3_next": _moe("Qwen3NextForCausalLM", "Qwen3NextConfig", True, num_experts=N_EXPERTS,
                       moe_intermediate_size=D_FF, shared_expert_intermediate_size=SHARED_FF, head_dim=HEAD_DIM),
    "qwen3_5_moe_text": _moe("Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextConfig", True, num_experts=N_EXPERTS,
                             moe_intermediate_size=D_FF, shared_expert_intermediate_size=SHARED_FF, head_dim=HEAD_DIM),
}


def tiny_model(family: str = "llama", seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of `family` (fp32, eval mode, no grads), reproducible by seed.

    `num_hidden_layers=` is accepted for every family (translated to `n_layer` for gpt2).
    """
    builders = {**FAMILIES, **MOE_FAMILIES}
    if family not in builders:
        raise KeyError(f"no tiny builder for family '{family}': have {', '.join(builders)}")
    if family == "gpt2" and "num_hidden_layers" in config_overrides:
        config_overrides["n_layer"] = config_overrides.pop("num_hidden_layers")
    return builders[family](seed, **config_overrides)


def _training_text() -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)[:40]
    return "\n\n".join(topics[k] for k in keys)[:60_000]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[EOS, PAD],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = _training_text()
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A fresh byte-level BPE `PreTrainedTokenizerFast` (vocab ~384) trained offline on pydoc text.

    eos = bos = `<|endoftext|>` (id 0), pad = `<|pad|>` (id 1). Deterministic; every call returns a new object
    (the trained vocabulary is cached), so a test may modify its tokenizer freely.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        model_max_length=1_000_000,  # corpora are tokenised whole and windowed later: no length warning
    )


def save_tiny_model_dir(path, family: str = "llama", seed: int = 0, **config_overrides) -> Path:
    """Write a tiny model and the tiny tokenizer to `path` (save_pretrained); returns the path.

    `superweight.models.load(str(path))` then loads it as a local model directory.
    """
    from transformers.utils import logging as hf_logging

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bars_were_off = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        tiny_model(family, seed, **config_overrides).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    finally:
        if not bars_were_off:
            hf_logging.enable_progress_bar()
    return path


def planted(*plants, seed: int = 0, family: str = "llama"):
    """A 6-layer tiny llama with planted super weights: for each (layer, row, col), neuron `col` is boosted
    (gate/up rows x8) and W[row, col] = 40, so the neuron fires hard and writes a massive activation into
    residual channel `row` - the mechanism of a real super weight, built in milliseconds."""
    model = tiny_model(family, seed=seed, num_hidden_layers=6, initializer_range=0.2)
    for layer, row, col in plants:
        mlp = model.model.layers[layer].mlp
        with torch.no_grad():
            mlp.gate_proj.weight[col] *= 8
            mlp.up_proj.weight[col] *= 8
            mlp.down_proj.weight[row, col] = 40.0
    return model


MARK = 11  # the residual channel that marks a planted super expert's token (not a planted row)


def planted_expert(family: str, layer: int = 0, expert=2, row: int = 5, col: int = 7, seed: int = 0,
                   num_hidden_layers: int = 4, word: str = "\n"):
    """A tiny MoE model of `family` with a planted super expert, as Su et al. (2025) find them in real MoE models:
    at every `word` token (the marked token: its embedding alone carries channel MARK) the router sends the token
    to `expert` (an index, or "shared") and its neuron `col` fires hard, and W_e[row, col] = 40 writes a massive
    activation into channel `row`. Every routed expert's down-projection is scaled by 0.1 first, so that, as in
    real MoE models, no ordinary expert matters much on its own (pruning one is a small control). Neuron and
    router read only the mark, so an expert pruned elsewhere in the layer sends no new token to fire it."""
    model = tiny_model(family, seed=seed, num_hidden_layers=num_hidden_layers, initializer_range=0.2)
    assert row != MARK
    token = tiny_tokenizer()(word)["input_ids"][0]
    mark = torch.zeros(model.config.hidden_size)
    mark[MARK] = 1.0
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, MARK] = 0.0
        emb[token, MARK] = 3.0
        for block in model.model.layers:
            block.mlp.experts.down_proj *= 0.1
        if expert == "shared":
            mlp.shared_expert.gate_proj.weight[col] = 4 * mark
            mlp.shared_expert.up_proj.weight[col] = 4 * mark
            mlp.shared_expert.down_proj.weight[row, col] = 40.0
        else:
            d_ff = mlp.experts.down_proj.shape[-1]
            mlp.experts.gate_up_proj[expert, col] = 4 * mark
            mlp.experts.gate_up_proj[expert, d_ff + col] = 4 * mark
            mlp.gate.weight[expert] += 10 * mark
            mlp.experts.down_proj[expert, row, col] = 40.0
    return model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model, before: dict[str, torch.Tensor]) -> None:
    """The model's state dict equals `before` bit for bit (same keys, dtypes and values)."""
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in now.items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def hook_count(model) -> int:
    return sum(
        len(getattr(m, attr))
        for m in model.modules()
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def handle(model, tokenizer=None, spec: str = "tiny", source: str = "memory", bos=None):
    """`model` and `tokenizer` (None: the tiny one) as the handle every stage takes, an io.models.Loaded, the way
    models.load makes one (fp32 on the CPU); `bos` (io/corpora.Bos) None: no token first (the tiny tokenizer adds
    none, so --bos auto gives the same)."""
    from superweight.io.corpora import NO_BOS
    from superweight.io.models import Loaded

    return Loaded(model=model, tokenizer=tokenizer or tiny_tokenizer(), spec=spec, source=source, dtype="fp32",
                  device="cpu", bos=bos or NO_BOS)
