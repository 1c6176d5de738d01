"""Function-preserving reparametrizations (core/reparam.py: one MLP's neurons, the residual stream, the norms'
gains), and what must not move under them: the trained repair in the balanced space, detection's scores and
grade, sparse training, and the invariant geometry."""

from __future__ import annotations


import pytest
import torch

from superweight.core.arch import decoder_layers, down_projection, family as family_of
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, Compose
from superweight.core.reparam import FIRST_PROJECTION, move_norm_gain, neuron_balance, rescale_mlp, rescale_residual
from superweight.errors import UnsupportedArchitectureError, UsageError
from superweight.io import corpora
from superweight.measure.geometry import geometry
from superweight.measure.grade import SUPER_PPL_RATIO, grade
from superweight.measure.inputs import patch_inputs
from superweight.stages import detect
from superweight.stages.sparsify import HardConcrete, L1Prox
from superweight.engine.config import FirstOrderConfig
from superweight.engine.train import train
from superweight.settings import revalidated
import tiny
from tiny import D_MODEL, FAMILIES, planted, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GATED = sorted(set(FIRST_PROJECTION) - {"opt"})
PLANT = (1, 5, 7)


def factors(d_ff: int, seed: int = 0, spread: float = 2.0) -> torch.Tensor:
    """Log-normal per-neuron factors (spread 2: from ~1/50 to ~50), a few negative for the gated MLPs."""
    return torch.exp(torch.randn(d_ff, generator=torch.Generator().manual_seed(seed)) * spread)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", GATED + ["opt"])
def test_rescaling_preserves_logits_and_moves_the_weight_by_its_factor(family, ids):
    model = tiny_model(family, seed=3)
    before = logits(model, ids)
    dp = down_projection(model, 1)
    w = dp.matrix.detach().clone()
    a = factors(dp.d_ff)
    if family not in ("opt",):
        a[::7] *= -1  # linear in up_proj: any non-zero factor
    rescale_mlp(model, 1, a)
    after = logits(model, ids)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4), (before - after).abs().max()
    # the same coordinates address the same weight, divided by its neuron's factor
    assert torch.allclose(dp.matrix, w / a[None, :], rtol=1e-5)
    assert not torch.allclose(dp.matrix, w)
    rescale_mlp(model, 1, 1 / a)
    assert torch.allclose(logits(model, ids), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_gelu_mlps_cannot_be_rescaled(family):
    with pytest.raises(UnsupportedArchitectureError, match="GELU"):
        rescale_mlp(tiny_model(family), 0, 2.0)


def test_bad_factors_are_refused():
    model = tiny_model("llama")
    d_ff = down_projection(model, 0).d_ff
    with pytest.raises(UsageError, match="factors"):
        rescale_mlp(model, 0, torch.ones(d_ff + 1))
    with pytest.raises(UsageError, match="non-zero"):
        rescale_mlp(model, 0, 0.0)
    with pytest.raises(UsageError, match="positive"):
        rescale_mlp(tiny_model("opt"), 0, -1.0)


def test_neuron_balance_follows_the_factors():
    model = tiny_model("llama", seed=2)
    n = neuron_balance(model, 0)
    a = factors(n.numel()).abs()
    rescale_mlp(model, 0, a)
    assert torch.allclose(neuron_balance(model, 0), n * a, rtol=1e-4)
    rescale_mlp(model, 0, 1 / neuron_balance(model, 0))  # balance it
    assert torch.allclose(neuron_balance(model, 0), torch.ones_like(n), rtol=1e-4)


def perturbed(model):
    """`model` with every 1-d parameter (biases, norm gains) moved off its initial 0 or 1, so that a bias or
    gain left out of a symmetry shows."""
    gen = torch.Generator().manual_seed(11)
    for p in model.parameters():
        if p.dim() == 1:
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def eps_free(model):
    """`model` with its norms' eps out of the way: rescale_residual is exact only up to eps, and the tiny models'
    residual (embeddings ~0.02, mean h^2 ~4e-4) at c = 1e-2 falls to ~4e-8, below rms_norm_eps = 1e-6. Each norm's
    eps goes to 1e-12; OLMo's LayerNorm hard-codes eps = 1e-5 in its forward, so there the residual is lifted
    first (x 1e4, itself a rescale_residual) to stay far above it at c = 1e-2."""
    for module in model.modules():
        for name in ("eps", "variance_epsilon"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 1e-12)
    if family_of(model) == "olmo":
        rescale_residual(model, 1e4)
    return model


NO_GAIN = {"olmo"}  # OLMo v1's LayerNorm has no gain to move


@pytest.mark.parametrize("c", [1e-2, 30.0])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rescaling_the_residual_stream_preserves_logits(family, c, ids):
    model = eps_free(perturbed(tiny_model(family, seed=3)))
    before = logits(model, ids)
    emb = model.get_input_embeddings().weight.detach().clone()
    dp = down_projection(model, 0)
    w = dp.matrix.detach().clone()
    rescale_residual(model, c)
    after = logits(model, ids)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4), (before - after).abs().max()
    assert torch.allclose(model.get_input_embeddings().weight, emb * c, rtol=1e-6)
    if family not in ("gemma2", "gemma3", "olmo2"):  # those scale their post-norms' gains instead
        assert torch.allclose(dp.matrix, w * c, rtol=1e-6)  # a super weight: the same coordinates, c times larger
    rescale_residual(model, 1 / c)
    assert torch.allclose(logits(model, ids), before, atol=1e-4, rtol=1e-4)


def gains():
    return [0.1, 10.0, torch.rand(D_MODEL, generator=torch.Generator().manual_seed(4)) * 5 + 0.1]


@pytest.mark.parametrize("b", range(3), ids=["0.1", "10", "per-channel"])
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - NO_GAIN))
def test_moving_the_norm_gains_preserves_logits(family, b, ids):
    model = perturbed(tiny_model(family, seed=3))  # no eps involved: the norms see the same input
    before = logits(model, ids)
    b = gains()[b]
    move_norm_gain(model, b)
    assert torch.allclose(before, logits(model, ids), atol=1e-4, rtol=1e-4)
    move_norm_gain(model, 1 / torch.as_tensor(b))
    assert torch.allclose(before, logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", GATED + ["opt"])
def test_the_three_symmetries_compose(family, ids):
    model = eps_free(perturbed(tiny_model(family, seed=3)))
    before = logits(model, ids)
    rescale_residual(model, 1e-2)
    if family not in NO_GAIN:
        move_norm_gain(model, gains()[2])
    for layer in range(len(decoder_layers(model))):
        rescale_mlp(model, layer, factors(down_projection(model, layer).d_ff, seed=layer, spread=1.0).abs())
    rescale_residual(model, 30.0)
    assert torch.allclose(before, logits(model, ids), atol=1e-4, rtol=1e-4), (before - logits(model, ids)).abs().max()


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma3"])
def test_tied_embeddings_are_untied_first(family, ids):
    model = eps_free(tiny_model(family, seed=3, tie_word_embeddings=True))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight is emb.weight
    before, w = logits(model, ids), emb.weight.detach().clone()
    rescale_residual(model, 30.0)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert torch.equal(model.get_output_embeddings().weight, w)  # the unembedding does not scale
    assert torch.allclose(model.get_input_embeddings().weight, w * 30.0)
    assert model.config.tie_word_embeddings is False and not model.all_tied_weights_keys
    model.tie_weights()  # nothing re-ties them
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert torch.allclose(before, logits(model, ids), atol=1e-4, rtol=1e-4)


def test_tied_embeddings_survive_a_save_and_load(tmp_path, ids):
    from transformers import AutoModelForCausalLM

    model = tiny_model("gpt2", seed=3)
    before = logits(model, ids)
    move_norm_gain(model, 10.0)  # the final norm's gain moves into lm_head
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(before, logits(loaded, ids), atol=1e-4, rtol=1e-4)


def test_weights_keep_their_dtype(ids):
    model = tiny_model("llama", seed=3).to(torch.bfloat16)
    before = logits(model, ids).float()
    rescale_residual(model, 4.0)
    move_norm_gain(model, 2.0)  # powers of two: exact in bf16 too
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.allclose(before, logits(model, ids).float(), atol=2e-2)


def test_olmo_has_no_norm_gain_to_move():
    with pytest.raises(UnsupportedArchitectureError, match="olmo's LayerNorm has no gain"):
        move_norm_gain(tiny_model("olmo"), 2.0)


def test_opt_without_pure_pre_norm_residual_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="do_layer_norm_before"):
        rescale_residual(tiny_model("opt", do_layer_norm_before=False), 2.0)
    with pytest.raises(UnsupportedArchitectureError, match="project_in"):
        move_norm_gain(tiny_model("opt", word_embed_proj_dim=16), 2.0)


def test_bad_scales_are_refused():
    model = tiny_model("llama")
    for c in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="positive"):
            rescale_residual(model, c)
    with pytest.raises(UsageError, match="non-zero"):
        move_norm_gain(model, 0.0)
    with pytest.raises(UsageError, match="non-zero"):
        move_norm_gain(model, torch.tensor([float("inf")] * D_MODEL))
    with pytest.raises(UsageError, match="gain factors"):
        move_norm_gain(model, torch.ones(D_MODEL + 1))


@pytest.fixture(scope="module")
def seqs():
    tok = tiny_tokenizer()
    ids = corpora.tokenize(tok, corpora.load_text("pydoc", "train"), 1024)
    return corpora.pack(ids, 64)


def _repair(model, seqs, cfg):
    coord = WeightCoord(layer=PLANT[0], row=PLANT[1], col=PLANT[2])
    patch, _ = train(model, [coord], [(PLANT[0], PLANT[1])], seqs, cfg)
    return coord, patch


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_balanced_training_gives_the_same_repair_at_every_scale(seqs, optimizer):
    cfg = FirstOrderConfig(steps=6, batch_size=2, seq_len=64, lr=0.05, optimizer=optimizer, space="balanced")
    model = planted(PLANT)
    d_ff = down_projection(model, PLANT[0]).d_ff
    coord, p1 = _repair(model, seqs, cfg)
    ref = p1.vectors[0].detach().clone()
    a = factors(d_ff, seed=5).abs()
    rescale_mlp(model, PLANT[0], a)
    _, p2 = _repair(model, seqs, cfg)
    # what the patch writes is the same: d_j scales by 1 / a_j (the patch file holds weight units)
    assert ref.abs().max() > 0
    assert torch.allclose(p2.vectors[0] * a, ref, rtol=1e-3, atol=1e-5 * ref.abs().max())


def test_weight_space_training_is_not_scale_free(seqs):
    """The control: the same optimiser on d itself lands elsewhere once the model is rescaled."""
    cfg = FirstOrderConfig(steps=6, batch_size=2, seq_len=64, lr=0.05, optimizer="sgd", space="weight")
    model = planted(PLANT)
    a = factors(down_projection(model, PLANT[0]).d_ff, seed=5).abs()
    _, p1 = _repair(model, seqs, cfg)
    rescale_mlp(model, PLANT[0], a)
    _, p2 = _repair(model, seqs, cfg)
    assert not torch.allclose(p2.vectors[0] * a, p1.vectors[0], rtol=1e-2)


@pytest.mark.parametrize("objective", [L1Prox(0.5), HardConcrete(10.0)])
def test_sparse_training_keeps_the_same_entries_at_every_scale(seqs, objective):
    cfg = FirstOrderConfig(steps=4, batch_size=2, seq_len=64, lr=0.3, optimizer="adam", space="balanced", seed=1)
    model = planted(PLANT)
    coord, dense = _repair(model, seqs, cfg)
    rows = [(PLANT[0], PLANT[1])]

    def sparse():
        torch.manual_seed(0)
        p, _ = train(model, [coord], rows, seqs, cfg, None, type(objective)(objective.strength, [v.detach() for v in dense.vectors]))
        return objective.final(p)[0]

    first = sparse()
    a = factors(first.numel(), seed=7).abs()
    rescale_mlp(model, PLANT[0], a)
    dense.vectors[0].data /= a  # the same patch in the rescaled model's units
    second = sparse()
    assert torch.equal(first != 0, second != 0)
    assert torch.allclose(second * a, first, rtol=1e-3, atol=1e-4 * first.abs().max())


def test_invariant_geometry_does_not_move_and_the_plain_one_does(seqs):
    model = planted(PLANT)
    coord = WeightCoord(layer=PLANT[0], row=PLANT[1], col=PLANT[2])
    rows = [(PLANT[0], PLANT[1])]
    d = torch.randn(down_projection(model, PLANT[0]).d_ff, generator=torch.Generator().manual_seed(0))
    d[PLANT[2]] = 30.0
    ids = seqs.flatten()[:256]

    def geo(vec):
        orig = [down_projection(model, PLANT[0]).get(PLANT[1], PLANT[2]).item()]
        return geometry(model, [coord], rows, [vec], orig, patch_inputs(model, [coord], rows, ids, 128))

    g1 = geo(d)
    a = factors(d.numel(), seed=9).abs()
    rescale_mlp(model, PLANT[0], a)
    g2 = geo(d / a)
    for key in ("balanced_norm", "write_rms", "write_cos_original_row", "write_cos_ablated", "value_ratio"):
        assert getattr(g1, key) == pytest.approx(getattr(g2, key), rel=1e-3), key
    assert [i for i, _ in g1.top_writes] == [i for i, _ in g2.top_writes]
    for key in ("norm", "cos_original_row", "cos_ablated_direction"):
        assert getattr(g1, key) != pytest.approx(getattr(g2, key), rel=1e-2), key


def test_detection_is_the_same_on_a_rescaled_model():
    tok = tiny_tokenizer()
    calib = corpora.tokenize(tok, corpora.load_text("pydoc", "train"), 1024)

    def run(model):
        loaded = tiny.handle(model, tok)
        return detect.run_detect(loaded, detect.DetectConfig(max_length=128), ids=calib).candidates

    model = planted(PLANT)
    first = run(model)
    for layer in range(len(model.model.layers)):  # every layer, each neuron by its own factor
        rescale_mlp(model, layer, factors(model.config.intermediate_size, seed=layer, spread=1.5).abs())
    second = run(model)
    assert [(c.layer, c.row, c.col) for c in first] == [(c.layer, c.row, c.col) for c in second]
    assert (first[0].layer, first[0].row, first[0].col) == PLANT and first[0].grade == second[0].grade
    for c1, c2 in zip(first, second):
        assert c1.kl == pytest.approx(c2.kl, rel=1e-3, abs=1e-6)
        assert c1.controls == c2.controls  # the controls are the same weights, not the largest |W|


@pytest.mark.parametrize("symmetry", ["residual", "norm gain"])
def test_detection_is_the_same_under_the_whole_network_symmetries(symmetry):
    tok = tiny_tokenizer()
    calib = corpora.tokenize(tok, corpora.load_text("pydoc", "train"), 1024)

    def run(model):
        loaded = tiny.handle(model, tok)
        return detect.run_detect(loaded, detect.DetectConfig(max_length=128), ids=calib).candidates

    model = eps_free(planted(PLANT))  # rms_norm_eps would matter at c = 1e-2 (see eps_free)
    first = run(model)
    if symmetry == "residual":
        rescale_residual(model, 1e-2)  # every down-projection 100x smaller, the same function
    else:
        move_norm_gain(model, gains()[2])  # per channel
    second = run(model)
    assert [(c.layer, c.row, c.col) for c in first] == [(c.layer, c.row, c.col) for c in second]
    assert (first[0].layer, first[0].row, first[0].col) == PLANT and first[0].grade == second[0].grade
    for c1, c2 in zip(first, second):
        assert c1.grade == c2.grade
        assert c1.kl == pytest.approx(c2.kl, rel=1e-3, abs=1e-6)
        assert c1.controls == c2.controls


def test_grades():
    assert grade(1.5, 5.0, 1e-4, True, 10) == "super weight"
    assert grade(0.2, SUPER_PPL_RATIO * 0.6, 1e-4, True, 10) == "sensitive weight"  # ~+20% PPL: not a super weight
    assert grade(0.9, 1.1, 1e-4, True, 10) == "super weight"  # a collapse that the PPL ratio understates
    assert grade(0.9, 1.1, 1e-4, False, 10) == "sensitive weight"  # not confirmed against its controls
    assert grade(0.05, 1.05, 1e-4, False, 10) == "sensitive weight"
    assert grade(0.05, 1.05, 0.01, False, 10) == "none"  # within the controls' reach
    assert grade(0.001, 1.001, 0.0, False, 10) == "none"  # negligible


def test_unplanted_model_has_no_super_weight():
    tok = tiny_tokenizer()
    calib = corpora.tokenize(tok, corpora.load_text("pydoc", "train"), 1024)
    loaded = tiny.handle(planted(), tok)
    cands = detect.run_detect(loaded, detect.DetectConfig(max_length=128), ids=calib).candidates
    assert cands and not any(c.grade == "super weight" for c in cands)


SYMMETRIES = {
    "residual": lambda m, d_ff: rescale_residual(m, 10.0),
    "gain": lambda m, d_ff: move_norm_gain(m, 0.1),
    "neuron": lambda m, d_ff: rescale_mlp(m, PLANT[0], factors(d_ff, seed=5).abs()),
    "all": lambda m, d_ff: (rescale_residual(m, 0.1), move_norm_gain(m, 10.0),
                            rescale_mlp(m, PLANT[0], factors(d_ff, seed=5).abs())),
}


@pytest.mark.parametrize("name", sorted(SYMMETRIES))
def test_the_default_repair_is_the_same_under_every_symmetry(seqs, name):
    """lbfgs in column coordinates: what the patch writes (x·d) and its held-out KL do not move."""
    from superweight.measure.inputs import down_inputs
    from superweight.engine.config import RECIPES, configure

    cfg = configure(RECIPES["lbfgs"], seq_len=64, budget=8)
    model = eps_free(planted(PLANT))
    d_ff = down_projection(model, PLANT[0]).d_ff
    probe = seqs[:1].flatten()
    coord = WeightCoord(layer=PLANT[0], row=PLANT[1], col=PLANT[2])
    p1, s1 = train(model, [coord], [(PLANT[0], PLANT[1])], seqs, cfg)
    x1, _ = down_inputs(model, probe, PLANT[0])
    write1 = x1 @ p1.vectors[0].detach()
    SYMMETRIES[name](model, d_ff)
    p2, s2 = train(model, [coord], [(PLANT[0], PLANT[1])], seqs, cfg)
    x2, _ = down_inputs(model, probe, PLANT[0])
    write2 = x2 @ p2.vectors[0].detach()
    scale = {"residual": 10.0, "all": 0.1}.get(name, 1.0)  # the write is in the residual's units
    assert s1.check.best_kl < 0.5 * s1.check.broken_kl  # it did repair
    assert s2.check.best_kl == pytest.approx(s1.check.best_kl, rel=2e-2, abs=1e-6)
    assert torch.allclose(write2, scale * write1, rtol=2e-2, atol=2e-2 * scale * write1.abs().max())
