"""metrics.measure against independent, straightforward re-implementations on a tiny llama."""

from __future__ import annotations

import math

import pytest
import torch

import tiny
from superweight.core import arch
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, NoIntervention
from superweight.io import corpora
from superweight.measure.metrics import Metrics, Scoring, measure, n_scored

pytestmark = pytest.mark.usefixtures("torch_single_thread")

N_TOKENS = 300
N_LAYERS = 3
# A planted "super weight": layer 0, residual channel ROW, reading the most active intermediate neuron.
LAYER, ROW = 0, 7
PLANTED = 200.0


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    ids = corpora.tokenize(tiny.tiny_tokenizer(), corpora.load_text("pydoc", "eval"), N_TOKENS)
    assert ids.numel() == N_TOKENS
    return ids


@pytest.fixture(scope="module")
def planted(ids):
    """(model, col): a tiny llama whose W_0[ROW, col] is huge, so that zeroing it matters."""
    model = tiny.tiny_model("llama", seed=0, num_hidden_layers=N_LAYERS)
    dp = arch.down_projection(model, LAYER)
    seen = {}
    handle = dp.module.register_forward_hook(lambda _m, inp, _o: seen.__setitem__("x", inp[0]))
    with torch.no_grad():
        model(ids[None, :64])
    handle.remove()
    col = int(seen["x"].abs().amax(dim=(0, 1)).argmax())
    assert col >= tiny.D_MODEL or ROW != col  # not a coordinate a row/col swap could also reach
    dp.set(ROW, col, PLANTED)
    return model, col


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def hooks(model) -> dict[str, tuple]:
    """Every module's forward (pre-)hooks. Compare before/after: transformers installs its own
    output-capturing hooks the first time hidden states are requested, so "none at all" is not the invariant."""
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}


# ----------------------------------------------------------------------- independent reference implementations

@torch.no_grad()
def plain_nll(model, ids, max_length):
    """Disjoint chunks through model(labels=...), each chunk's mean loss weighted by its scored-token count."""
    total, count = 0.0, 0
    for begin in range(0, ids.numel(), max_length):
        chunk = ids[begin : begin + max_length][None]
        if chunk.shape[1] < 2:
            continue
        loss = model(input_ids=chunk, labels=chunk).loss
        total += loss.item() * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return total / count, count


@torch.no_grad()
def hf_sliding_nll(model, ids, max_length, stride):
    """HF's "perplexity of fixed-length models" loop, weighting each window by the labels it really scores."""
    n = ids.numel()
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        k = int((target[:, 1:] != -100).sum())  # the model shifts labels by one internally
        if k:
            total += model(input_ids=input_ids, labels=target).loss.item() * k
            count += k
        prev_end = end
        if end == n:
            break
    return total / count, count


@torch.no_grad()
def chunk_logprobs(model, ids, max_length):
    """Per chunk: fp32 log-probs of positions 0..L-2 (predicting 1..L-1) and the targets."""
    out = []
    for begin in range(0, ids.numel(), max_length):
        chunk = ids[begin : begin + max_length]
        if chunk.numel() < 2:
            continue
        logits = model(input_ids=chunk[None]).logits[0, :-1].float()
        out.append((torch.log_softmax(logits, -1), chunk[1:]))
    return out


@torch.no_grad()
def block_output_max(model, ids, max_length, layer, row, hidden_index=True):
    """max |residual[..., row]| after block `layer`, over all positions of the disjoint chunks."""
    best = 0.0
    for begin in range(0, ids.numel(), max_length):
        chunk = ids[begin : begin + max_length][None]
        if chunk.shape[1] < 2:
            continue
        hs = model(input_ids=chunk, output_hidden_states=True).hidden_states
        # hidden_states[0] is the embedding output, hidden_states[L + 1] the output of block L.
        best = max(best, hs[layer + 1][..., row].abs().max().item())
    return best


# ------------------------------------------------------------------------------------------------- tests

def test_base_agrees_with_itself(planted, ids):
    model, _ = planted
    out = measure(model, ids, max_length=64)
    assert set(out) == {"base"}
    base = out["base"]
    assert isinstance(base, Metrics)
    assert base.kl == 0.0
    assert base.top1_agree == 1.0
    assert base.n_tokens == n_scored(N_TOKENS, 64) == N_TOKENS - math.ceil(N_TOKENS / 64)
    assert base.ppl == pytest.approx(math.exp(base.nll), rel=1e-12)
    assert base.super_activation is None and base.super_activation_by_channel == {}
    # A random tiny model is close to uniform over its vocabulary, but not exactly.
    assert 0.5 * math.log(tiny.VOCAB) < base.nll < 2 * math.log(tiny.VOCAB)


@pytest.mark.parametrize("max_length", [64, 50, 512])
@pytest.mark.parametrize("batch_tokens", [1, 200, 2048])
def test_nll_disjoint_windows_equals_plain_loop(planted, ids, max_length, batch_tokens):
    model, _ = planted
    expected, count = plain_nll(model, ids, max_length)
    for stride in (None, max_length):
        base = measure(model, ids, max_length=max_length, stride=stride, scoring=Scoring(batch_tokens=batch_tokens))["base"]
        assert base.n_tokens == count
        assert base.nll == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("max_length, stride", [(64, 24), (64, 63), (40, 7), (512, 100)])
def test_nll_sliding_windows_equals_hf_recipe(planted, ids, max_length, stride):
    model, _ = planted
    expected, count = hf_sliding_nll(model, ids, max_length, stride)
    base = measure(model, ids, max_length=max_length, stride=stride, scoring=Scoring(batch_tokens=256))["base"]
    assert base.n_tokens == count
    if max_length < N_TOKENS:
        assert count == N_TOKENS - 1  # overlapping windows score every target once
    assert base.nll == pytest.approx(expected, abs=1e-5)


def test_ablating_the_planted_weight(planted, ids):
    model, col = planted
    before, hooks_before = snapshot(model), hooks(model)
    coord = WeightCoord(layer=LAYER, row=ROW, col=col)
    channels = [(LAYER, ROW), (1, ROW), (1, 3)]
    out = measure(model, ids, {"ablated": Ablation(model, [coord]), "noop": NoIntervention()},
                  channels=channels, max_length=64)
    base, ablated, noop = out["base"], out["ablated"], out["noop"]
    assert_identical(model, before)
    assert hooks(model) == hooks_before
    assert ablated.kl > 1e-4
    assert ablated.top1_agree < 1.0
    assert noop.kl == pytest.approx(0.0, abs=1e-7) and noop.top1_agree == 1.0
    assert noop.nll == pytest.approx(base.nll, abs=1e-6)
    assert ablated.n_tokens == base.n_tokens == noop.n_tokens

    # Independent KL(base || ablated), top-1 agreement and NLL over the same disjoint windows.
    base_lp = chunk_logprobs(model, ids, 64)
    with Ablation(model, [coord]):
        abl_lp = chunk_logprobs(model, ids, 64)
    assert_identical(model, before)
    kl = sum((p.exp() * (p - q)).sum().item() for (p, _), (q, _) in zip(base_lp, abl_lp))
    agree = sum(int((p.argmax(-1) == q.argmax(-1)).sum()) for (p, _), (q, _) in zip(base_lp, abl_lp))
    nll = -sum(q.gather(-1, t[:, None]).sum().item() for q, t in abl_lp)
    n = sum(t.numel() for _, t in abl_lp)
    assert n == ablated.n_tokens
    assert ablated.kl == pytest.approx(kl / n, rel=1e-4, abs=1e-7)
    assert ablated.top1_agree == pytest.approx(agree / n, abs=1e-12)
    assert ablated.nll == pytest.approx(nll / n, abs=1e-5)

    # The planted weight makes a super activation in channel ROW; ablating it removes it.
    key = f"{LAYER}:{ROW}"
    assert base.super_activation_by_channel[key] > 50 * ablated.super_activation_by_channel[key]
    assert set(base.super_activation_by_channel) == {f"{l}:{r}" for l, r in channels}
    assert base.super_activation == max(base.super_activation_by_channel.values())


def test_super_activation_equals_hidden_states(planted, ids):
    model, col = planted
    channels = [(0, ROW), (1, ROW), (0, 3), (1, 30)]  # non-final layers: hidden_states[L + 1] is block L
    coord = WeightCoord(layer=LAYER, row=ROW, col=col)
    out = measure(model, ids, {"ablated": Ablation(model, [coord])}, channels=channels, max_length=64)
    for layer, row in channels:
        expected = block_output_max(model, ids, 64, layer, row)
        assert out["base"].super_activation_by_channel[f"{layer}:{row}"] == pytest.approx(expected, rel=1e-6)
        with Ablation(model, [coord]):
            expected = block_output_max(model, ids, 64, layer, row)
        assert out["ablated"].super_activation_by_channel[f"{layer}:{row}"] == pytest.approx(expected, rel=1e-6)
    acts = out["base"].super_activation_by_channel
    assert acts[f"0:{ROW}"] > 20 * acts["0:3"]  # the planted weight shows


def test_super_activation_of_last_layer_is_before_the_final_norm(planted, ids):
    model, _ = planted
    last = N_LAYERS - 1
    got = measure(model, ids, channels=[(last, ROW)], max_length=64)["base"].super_activation
    seen = []
    block = arch.decoder_layers(model)[last]
    handle = block.register_forward_hook(lambda _m, _i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            for begin in range(0, N_TOKENS, 64):
                model(input_ids=ids[begin : begin + 64][None])
    finally:
        handle.remove()
    expected = max(t[..., ROW].abs().max().item() for t in seen)
    assert got == pytest.approx(expected, rel=1e-6)
    # hidden_states[-1] has the final norm applied and is a different number.
    assert block_output_max(model, ids, 64, last, ROW) != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma2", "gpt_neox"])
def test_super_activation_other_families(family, ids):
    model = tiny.tiny_model(family, seed=1)
    short = ids[:96]
    out = measure(model, short, channels=[(0, 5)], max_length=48)
    assert out["base"].super_activation_by_channel["0:5"] == pytest.approx(
        block_output_max(model, short, 48, 0, 5), rel=1e-6
    )
    assert out["base"].nll == pytest.approx(plain_nll(model, short, 48)[0], abs=1e-5)


def test_base_is_a_reserved_condition_name(planted, ids):
    model, col = planted
    before = snapshot(model)
    with pytest.raises(ValueError, match="base"):
        measure(model, ids, {"base": Ablation(model, [WeightCoord(layer=LAYER, row=ROW, col=col)])})
    assert_identical(model, before)


def test_progress_and_no_side_effects(planted, ids):
    model, col = planted
    before, hooks_before = snapshot(model), hooks(model)
    seen = []
    out = measure(model, ids, {"a": Ablation(model, [WeightCoord(layer=LAYER, row=ROW, col=col)])},
                  channels=[(LAYER, ROW)], max_length=64, stride=32,
                  scoring=Scoring(batch_tokens=128, progress=seen.append))
    assert sum(seen) == out["base"].n_tokens == N_TOKENS - 1
    assert len(seen) > 1
    assert_identical(model, before)
    assert hooks(model) == hooks_before
    assert torch.is_grad_enabled()  # measure's no_grad does not leak


def test_bf16_model_is_scored_in_fp32(planted, ids):
    model, _ = planted
    bf16 = tiny.tiny_model("llama", seed=0, num_hidden_layers=N_LAYERS)
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    fp32 = measure(model, ids, max_length=64)["base"]
    low = measure(bf16, ids, max_length=64)["base"]
    assert math.isfinite(low.nll)
    assert low.nll == pytest.approx(fp32.nll, abs=0.05)


# ------------------------------------------------------------------------------- known bugs (see report)

def test_measure_rejects_stride_zero(planted, ids):
    from superweight.errors import UsageError

    model, _ = planted
    with pytest.raises(UsageError):
        measure(model, ids[:40], max_length=16, stride=0)


# ------------------------------------------------------------------------------------------------------- BOS

BOS = corpora.Bos.first(0)  # the tiny tokenizer's BOS (= EOS); it does not add one itself: --bos auto gives none


@torch.no_grad()
def plain_nll_with_bos(model, ids, max_length):
    """[BOS] + max_length - 1 tokens per chunk through model(labels=...): every text token is a target."""
    total, count = 0.0, 0
    for begin in range(0, ids.numel(), max_length - 1):
        chunk = torch.cat([torch.tensor([BOS.token]), ids[begin : begin + max_length - 1]])[None]
        total += model(input_ids=chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return total / count, count


def test_measure_with_bos_scores_the_first_token_too(planted, ids):
    model, col = planted
    short = ids[:50]
    without = measure(model, short, max_length=64)["base"]
    with_bos = measure(model, short, max_length=64, bos=BOS)["base"]
    assert (without.n_tokens, with_bos.n_tokens) == (49, 50)  # one more: token 0, predicted from the BOS
    assert with_bos.nll != without.nll  # (a random tiny model is near uniform: the numbers are close)
    expected, count = plain_nll_with_bos(model, ids, 64)
    coord = WeightCoord(layer=LAYER, row=ROW, col=col)
    for batch_tokens in (1, 2048):
        out = measure(model, ids, {"ablated": Ablation(model, [coord])}, max_length=64, bos=BOS,
                      scoring=Scoring(batch_tokens=batch_tokens))
        assert out["base"].n_tokens == out["ablated"].n_tokens == count == N_TOKENS == n_scored(N_TOKENS, 64, bos=BOS)
        assert out["base"].nll == pytest.approx(expected, abs=1e-5)
        assert out["ablated"].kl > 0


def test_down_inputs_with_bos_read_the_windows_measure_reads(planted, ids):
    from superweight.measure.inputs import down_inputs, seen_ids

    model, _ = planted
    x, positions = down_inputs(model, ids[:100], LAYER, max_length=40, bos=BOS)
    seen = seen_ids(ids[:100], 40, BOS)
    assert x.shape[0] == len(positions) == seen.numel() == 100 + 3  # windows of a BOS and 39 tokens
    assert [i for i, p in enumerate(positions) if p == 0] == [0, 40, 80]
    assert (seen[[0, 40, 80]] == BOS.token).all() and seen[1:40].tolist() == ids[:39].tolist()
    plain, plain_positions = down_inputs(model, ids[:100], LAYER, max_length=40)
    assert plain.shape[0] == 100 and plain_positions[40] == 0 and seen_ids(ids[:100], 40).equal(ids[:100])
    assert not torch.allclose(x[1:40], plain[:39])  # the BOS changes what the layer reads
