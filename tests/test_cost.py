"""Bounded memory and the cost account: chunked scoring equals whole-logit scoring, the head check finds every
family's logits, and the ledger counts tokens x layers, forward and backward apart."""

from __future__ import annotations

import pytest
import torch

import tiny
from superweight.core import arch
from superweight.core.cost import Ledger, part
from superweight.core.coords import WeightCoord
from superweight.core.head import head_of, trunk
from superweight.core.intervene import Ablation, RowPatch
from superweight.core.prefix import Prefix
from superweight.io import corpora
from superweight.measure.metrics import Scoring, measure

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return corpora.tokenize(tiny.tiny_tokenizer(), corpora.load_text("pydoc", "eval"), 200)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gemma2", "gpt2", "opt", "gpt_neox"])
def test_head_reproduces_the_models_logits(family):
    model = tiny.tiny_model(family, seed=0)
    head = head_of(model)
    assert head is not None
    x = torch.arange(3, 11)[None]
    with torch.no_grad():
        whole = model(input_ids=x, use_cache=False).logits
        mine = head(trunk(model)(input_ids=x, use_cache=False).last_hidden_state)
    torch.testing.assert_close(mine, whole, rtol=0, atol=1e-5)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_chunked_scores_equal_whole_logits(family, ids, monkeypatch):
    """A byte budget small enough for chunks of a few tokens (and one-window batches) moves no number by more than
    1e-6 relative (a near-zero KL: 5e-8 nats) against the whole-logit path (the model's own logits, one chunk)."""
    model = tiny.planted((1, 3, 5), family=family)
    conditions = lambda: {"ablated": Ablation(model, [WeightCoord(layer=1, row=3, col=5)]),  # noqa: E731
                          "other": Ablation(model, [WeightCoord(layer=2, row=1, col=2)])}
    vocab = model.get_output_embeddings().weight.shape[0]
    small = measure(model, ids, conditions(), [(1, 3)], max_length=64,
                    scoring=Scoring(share_below=1, chunk_bytes=vocab * 4 * 4 * 3))  # 3 tokens a chunk
    import superweight.measure.metrics as metrics
    monkeypatch.setattr(metrics, "head_of", lambda _m: None)  # the model's whole logits
    whole = measure(model, ids, conditions(), [(1, 3)], max_length=64,
                    scoring=Scoring(share_below=1, chunk_bytes=2**30))
    for name in whole:
        a, b = small[name], whole[name]
        assert a.n_tokens == b.n_tokens
        for key in ("nll", "ppl", "top1_agree", "super_activation"):
            assert _relative(getattr(a, key), getattr(b, key)) <= 1e-6, (name, key)
        # a control's KL (~1e-4) is a difference of nearly equal fp32 log-probs: 5e-8 nats absolute there
        assert abs(a.kl - b.kl) <= max(1e-6 * b.kl, 5e-8), name
    assert whole["ablated"].kl > 1e-2


def test_ledger_counts_tokens_times_layers():
    model = tiny.tiny_model("llama", seed=0, num_hidden_layers=4)
    x = torch.arange(3, 13).reshape(2, 5)
    with Ledger(model) as ledger:
        with ledger.stage("plain"), torch.no_grad():
            model(input_ids=x, use_cache=False)
        with ledger.stage("shared"), torch.no_grad():
            prefix = Prefix(model, 2)
            with prefix.capture():
                model(input_ids=x, use_cache=False)
            with part("above"), prefix.reuse(prefix.hidden):  # blocks 0 and 1 are skipped: not counted
                model(input_ids=x, use_cache=False)
        with ledger.stage("train"):
            patch = RowPatch(model, [(2, 1)])
            patch.vectors[0].requires_grad_(True)
            with patch:
                model(input_ids=x, use_cache=False).logits.sum().backward()
    c = ledger.counts
    assert (c["plain"].forward, c["plain"].backward) == (10 * 4, 0)
    assert c["shared"].forward == 10 * 4 + 10 * 2 and c["shared"].parts["above"].forward == 10 * 2
    assert (c["train"].forward, c["train"].backward) == (10 * 4, 10 * 2)  # gradient reaches layers 2 and 3
    model(input_ids=x, use_cache=False)  # outside a stage, and after the ledger closed: nothing counts
    assert c["plain"].forward == 40


def test_measure_counts_each_condition_apart(ids):
    model = tiny.tiny_model("llama", seed=0, num_hidden_layers=3)
    with Ledger(model) as ledger, ledger.stage("eval"):
        out = measure(model, ids[:100], {"broken": Ablation(model, [WeightCoord(layer=1, row=3, col=5)])},
                      max_length=50, scoring=Scoring(share_below=1))
    c = ledger.counts["eval"]
    assert c.parts["base"].forward == 100 * 3 and c.parts["broken"].forward == 100 * 2
    assert out["base"].n_tokens == 98


@pytest.mark.parametrize("cached", [False, True])
def test_chunked_training_loss_and_gradient_equal_whole_logits(cached, monkeypatch):
    """The repair's KL and its gradient through the patch, over chunks of 3 tokens (checkpointed) and from the
    whole logits, agree to 1e-6 relative; the teacher's cached (fp16) targets too."""
    import superweight.engine.objective as objective
    from superweight.engine.config import RECIPES

    model = tiny.planted((1, 3, 5))
    cfg = RECIPES["lbfgs"]
    seqs = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(seqs)
    ablation = Ablation(model, [WeightCoord(layer=1, row=3, col=5)])

    def loss_and_grad():
        prefix = Prefix(model, 1)
        teacher = objective.Teacher(model, prefix, seqs, mask, cfg, keep=cached)
        patch = RowPatch(model, [(1, 3)], [torch.randn(tiny.tiny_model().config.intermediate_size,
                                                       generator=torch.Generator().manual_seed(1))])
        patch.vectors[0].requires_grad_(True)
        teacher([0, 1])
        loss = teacher.loss(teacher([0, 1]), ablation, patch)
        loss.backward()
        return loss.item(), patch.vectors[0].grad.clone()

    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(objective, "CHUNK_BUDGET", vocab * 4 * 4 * 3)
    small = loss_and_grad()
    monkeypatch.setattr(objective, "head_of", lambda _m: None)
    whole = loss_and_grad()
    assert small[0] == pytest.approx(whole[0], rel=1e-6) and whole[0] > 1e-3
    torch.testing.assert_close(small[1], whole[1], rtol=1e-5, atol=1e-6 * whole[1].abs().max().item())


def test_per_condition_shared_blocks_change_no_number(ids):
    """Each condition starting from the base's state at its own layer gives the numbers of full passes, counts
    only the blocks it runs, and reports the base's super activation for a channel below its layer."""
    model = tiny.planted((1, 3, 5))
    conditions = lambda: {"low": Ablation(model, [WeightCoord(layer=1, row=3, col=5)]),  # noqa: E731
                          "high": Ablation(model, [WeightCoord(layer=4, row=1, col=2)])}
    with Ledger(model) as ledger, ledger.stage("x"):
        shared = measure(model, ids[:100], conditions(), [(1, 3)], max_length=50,
                         scoring=Scoring(share_below={"low": 1, "high": 4}))
    full = measure(model, ids[:100], conditions(), [(1, 3)], max_length=50)
    for name in full:
        for key in ("nll", "kl", "top1_agree", "super_activation"):
            assert getattr(shared[name], key) == pytest.approx(getattr(full[name], key), rel=1e-6, abs=1e-9)
    parts = ledger.counts["x"].parts
    assert (parts["base"].forward, parts["low"].forward, parts["high"].forward) == (600, 500, 200)


def test_subset_conditions_stop_at_their_tokens_and_compare_on_the_same(ids):
    """A condition limited to the first window is scored there only; base@n and broken@n cover the same tokens
    and equal a measurement of those tokens alone."""
    model = tiny.planted((1, 3, 5))
    broken = lambda: Ablation(model, [WeightCoord(layer=1, row=3, col=5)])  # noqa: E731
    out = measure(model, ids[:200], {"broken": broken(), "control": Ablation(model, [WeightCoord(layer=2, row=1, col=2)])},
                  max_length=50, scoring=Scoring(share_below=1, subsets={"control": 40}))
    alone = measure(model, ids[:50], {"broken": broken(), "control": Ablation(model, [WeightCoord(layer=2, row=1, col=2)])},
                    max_length=50, scoring=Scoring(share_below=1))
    assert out["control"].n_tokens == out["base@40"].n_tokens == out["broken@40"].n_tokens == 49
    assert out["base"].n_tokens == 196 and "control@40" not in out
    for name in ("base", "broken"):
        assert out[f"{name}@40"].nll == pytest.approx(alone[name].nll, rel=1e-6)
    assert out["control"].kl == pytest.approx(alone["control"].kl, rel=1e-5, abs=5e-8)


def test_nll_gap_interval_brackets_the_recovery():
    from superweight.measure.recovery import nll_gap_interval

    gen = torch.Generator().manual_seed(0)
    base = torch.rand(512, generator=gen)
    broken = base + 2 + torch.rand(512, generator=gen)
    half = (base + broken) / 2 + 0.1 * torch.randn(512, generator=gen)
    lo, hi = nll_gap_interval(base, broken, half)
    point = ((broken - half).sum() / (broken - base).sum()).item()
    assert lo < point < hi and hi - lo < 0.1
    assert nll_gap_interval(base[:40], broken[:40], half[:40]) is None


def test_generation_runs_on_one_cpu_thread_and_gives_the_threads_back(monkeypatch):
    """Greedy decoding on a CPU runs with one thread (tiny operations, one token at a time) and restores the
    thread count afterwards, also when it fails."""
    from superweight.measure import generate

    model, tok = tiny.tiny_model(), tiny.tiny_tokenizer()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the caller's count (the suite runs on one)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    before = 2
    seen = []
    real = generate.greedy
    monkeypatch.setattr(generate, "greedy", lambda *a, **k: (seen.append(calls[-1]), real(*a, **k))[1])
    rows = generate.compare(model, tok, {}, ["a b c"], max_new_tokens=2)
    assert seen == [1] and calls == [1, before] and rows[0]["prompt"] == "a b c"
    monkeypatch.setattr(generate, "greedy", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        generate.compare(model, tok, {}, ["a b c"], max_new_tokens=2)
    assert calls == [1, before, 1, before]


def test_generations_of_all_prompts_in_one_batch_are_the_one_by_one_texts():
    """compare() decodes every prompt of a condition as one left-padded batch: the same text as one at a time, for
    prompts of different lengths, under an intervention too."""
    import tiny
    from superweight.core.coords import parse_coord
    from superweight.core.intervene import Ablation
    from superweight.measure import generate

    model, tok = tiny.tiny_model(), tiny.tiny_tokenizer()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts = ["a", "the cat sat on the mat and", "x y"]
    broken = Ablation(model, [parse_coord("1:5:7")])
    rows = generate.compare(model, tok, {"broken": broken}, prompts, max_new_tokens=6)
    for row, prompt in zip(rows, prompts):
        assert row["base"] == generate.greedy(model, tok, prompt, 6)
        with broken:
            assert row["broken"] == generate.greedy(model, tok, prompt, 6)
    assert len({row["base"] for row in rows}) > 1  # the prompts give different texts: rows are not mixed up


def test_row_edit_conditions_decode_in_the_base_batch_with_their_own_texts(monkeypatch):
    """An ablation and a row patch are edits of down-projection rows: compare() decodes base and both in one
    batch (one greedy call), each condition on its own rows, to the texts each gives decoded alone; a condition
    that is no row edit (a hook on the activations) sends it back to one batch per condition."""
    from superweight.core.coords import parse_coord
    from superweight.core.intervene import ActivationRestore, Compose, RowPatch
    from superweight.measure import generate

    model, tok = tiny.planted((1, 3, 5)), tiny.tiny_tokenizer()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts = ["a", "the cat sat on the mat and", "x y"]
    coords = [parse_coord("1:3:5")]
    broken = Ablation(model, coords)
    fixed = Compose(broken, RowPatch(model, [(1, 3)], [torch.randn(64, generator=torch.Generator().manual_seed(0))
                                                       * 50]))
    conditions = {"broken": broken, "patched": fixed}
    calls = []
    real = generate.greedy
    monkeypatch.setattr(generate, "greedy", lambda *a, **k: (calls.append(len(a[2])), real(*a, **k))[1])
    rows = generate.compare(model, tok, conditions, prompts, max_new_tokens=6)
    assert calls == [3 * len(prompts)]
    for row, prompt in zip(rows, prompts):
        assert row["base"] == real(model, tok, prompt, 6)
        for name, intervention in conditions.items():
            with intervention:
                assert row[name] == real(model, tok, prompt, 6), (name, prompt)
    assert any(r["broken"] != r["base"] for r in rows) and any(r["patched"] != r["broken"] for r in rows)
    calls.clear()
    restore = Compose(broken, ActivationRestore(model, coords, [1.0]))
    assert restore.row_edits() is None
    generate.compare(model, tok, {"broken": broken, "restored": restore}, prompts, max_new_tokens=2)
    assert calls == [len(prompts)] * 3


def test_trainings_on_one_sequences_run_the_teacher_once_and_train_the_same_patch():
    """A second training handed the same Sequences reads the intact model's targets and the check's no-patch KL
    kept by the first: fewer full passes (only the student's blocks above the patch), and the patch and check it
    gives are bit for bit those of a training on fresh sequences. A control trained unchecked on the checked
    patch's sequences (Sequences.trained_part) finds all their targets kept."""
    from superweight.engine.config import RECIPES, configure
    from superweight.engine.objective import Sequences
    from superweight.engine.train import train

    model = tiny.planted((1, 3, 5), family="llama")
    coords, rows = [WeightCoord(layer=1, row=3, col=5)], [(1, 3)]
    seqs = torch.randint(2, 300, (8, 16), generator=torch.Generator().manual_seed(0))  # 6 trained on, 2 checked
    cfg = configure(RECIPES["lbfgs"], budget=4)
    shared = Sequences(seqs)
    with Ledger(model) as ledger:
        with ledger.stage("first"):
            train(model, coords, rows, shared, cfg)
        with ledger.stage("again"):
            again, again_training = train(model, coords, rows, shared, cfg)
        with ledger.stage("fresh"):
            fresh, fresh_training = train(model, coords, rows, seqs, cfg)
        with ledger.stage("control"):  # another row, unchecked, on the sequences the checked patch trained on
            train(model, coords, [(1, 7)], shared.trained_part(cfg.check_sequences), configure(cfg, check_sequences=0))
    c = ledger.counts
    # every block the control runs forward above the patch gets its gradient: no teacher pass (all kept)
    assert c["control"].forward == c["control"].backward > 0
    assert c["again"].forward < c["fresh"].forward and c["again"].backward == c["fresh"].backward
    n_layers = len(arch.decoder_layers(model))
    # what the kept targets save: one full pass of every sequence trained (4 of the 6) or checked (2), 16 tokens each
    assert c["fresh"].forward - c["again"].forward >= 6 * 16 * n_layers
    assert torch.equal(again.vectors[0], fresh.vectors[0])
    assert again_training.check == fresh_training.check


def test_a_kept_base_pass_serves_the_next_measure_with_the_same_numbers(ids):
    """measure() with a Passes runs the base pass once per window: a second call on the same windows (here fewer
    of them, as `run`'s analyses take the repair's first windows) runs only its conditions and gives the numbers
    of a call that runs base itself; a batch with a window it has not kept is run."""
    from superweight.measure.metrics import Passes

    model = tiny.planted((1, 3, 5))
    broken = lambda: {"broken": Ablation(model, [WeightCoord(layer=1, row=3, col=5)])}  # noqa: E731
    passes, bos = Passes(), corpora.Bos.first(1)
    args = dict(channels=[(1, 3)], max_length=50, bos=bos)
    with Ledger(model) as ledger:
        with ledger.stage("first"):
            measure(model, ids[:147], broken(), scoring=Scoring(share_below=1, passes=passes), **args)
        with ledger.stage("kept"):
            kept = measure(model, ids[:98], broken(), scoring=Scoring(share_below=1, passes=passes), **args)
        with ledger.stage("more"):
            measure(model, ids[:196], broken(), scoring=Scoring(share_below=1, passes=passes), **args)
    fresh = measure(model, ids[:98], broken(), scoring=Scoring(share_below=1), **args)
    c = ledger.counts
    assert "base" in c["first"].parts and "base" not in c["kept"].parts
    assert c["more"].parts["base"].forward > 0  # a batch with a window not kept runs its base pass
    for name in ("base", "broken"):
        for key in ("nll", "kl", "top1_agree", "super_activation"):
            assert getattr(kept[name], key) == pytest.approx(getattr(fresh[name], key), rel=1e-6, abs=1e-9), (name, key)
    assert kept["broken"].kl > 1e-3


def test_a_kept_condition_pass_serves_a_later_measure_of_the_same_edit(ids):
    """A condition named in Scoring.keep is kept by its identity: a later call that names the same identity (even
    under another condition name) reads its pass, with the numbers of a fresh call; another identity runs."""
    from superweight.core.patching import edit_identity
    from superweight.measure.metrics import Passes

    model = tiny.planted((1, 3, 5))
    coords = [WeightCoord(layer=1, row=3, col=5)]
    passes, bos = Passes(), corpora.Bos.first(1)
    args = dict(channels=[(1, 3)], max_length=50, bos=bos)
    scoring = lambda keep: Scoring(share_below=1, passes=passes, keep=keep)  # noqa: E731
    with Ledger(model) as ledger:
        with ledger.stage("first"):
            measure(model, ids[:147], {"broken": Ablation(model, coords)}, scoring=scoring(
                {"broken": edit_identity(coords)}), **args)
        with ledger.stage("kept"):
            kept = measure(model, ids[:98], {"ablated": Ablation(model, coords)}, scoring=scoring(
                {"ablated": edit_identity(coords)}), **args)
        with ledger.stage("other"):
            measure(model, ids[:98], {"ablated": Ablation(model, coords)}, scoring=scoring(
                {"ablated": edit_identity([WeightCoord(layer=1, row=3, col=5, scale=0.5)])}), **args)
    fresh = measure(model, ids[:98], {"ablated": Ablation(model, coords)}, scoring=Scoring(share_below=1), **args)
    c = ledger.counts
    assert c["first"].parts["broken"].forward > 0
    assert c["kept"].forward == 0  # base and the condition both read from what the first call kept
    assert c["other"].parts["ablated"].forward > 0
    for key in ("nll", "kl", "top1_agree", "super_activation"):
        assert getattr(kept["ablated"], key) == pytest.approx(getattr(fresh["ablated"], key), rel=1e-6, abs=1e-9), key
    assert kept["ablated"].kl > 1e-3
    with pytest.raises(ValueError, match="base"):
        measure(model, ids[:98], {"x": Ablation(model, coords)}, scoring=scoring({"x": "base"}), **args)


def test_patch_identity_names_the_edit_exactly():
    from superweight.core.patching import edit_identity

    coords = [WeightCoord(layer=1, row=3, col=5)]
    v = torch.arange(4, dtype=torch.float32)
    assert edit_identity(coords) == "ablate 1:3:5"
    assert edit_identity(coords, [(1, 3)], [v]) == edit_identity(coords, [(1, 3)], [v.clone()])
    assert edit_identity(coords, [(1, 3)], [v]) != edit_identity(coords, [(1, 3)], [v + 1e-7 * (v + 1)])
    assert edit_identity(coords, [(1, 3)], [v]) != edit_identity(coords, [(1, 4)], [v])
