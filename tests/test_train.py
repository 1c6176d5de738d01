"""engine/train.py: KL-distilled row patches on a planted tiny llama, the data order, the loss, and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tiny
from tiny import assert_identical, hook_count, planted, snapshot
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, Compose
from superweight.errors import UsageError
from superweight.io import corpora
from superweight.measure.metrics import measure
from superweight.measure.recovery import recovery
from superweight.progress import EachStep
from superweight.engine.config import FirstOrderConfig
from superweight.engine.objective import kl_loss
from superweight.engine.optimize import batch_indices, epoch_order
from superweight.engine.train import Track, train
from superweight.settings import revalidated

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PLANT = (1, 5, 7)
COORDS = [WeightCoord(layer=1, row=5, col=7)]
TESTS_DIR = Path(__file__).resolve().parent


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def ids():
    tok = tiny.tiny_tokenizer()
    return {
        "train": corpora.tokenize(tok, corpora.load_text("pydoc", "train"), 2048),
        "eval": corpora.tokenize(tok, corpora.load_text("pydoc", "eval"), 1024),
    }


@pytest.fixture(scope="module")
def seqs(ids):
    return corpora.pack(ids["train"], 32)  # [64, 32]


# ----------------------------------------------------------------------------------------------- training


def test_training_reduces_the_loss_and_repairs_the_model(ids, seqs):
    model = planted(PLANT)
    before = snapshot(model)
    losses = []
    cfg = FirstOrderConfig(steps=30, batch_size=8, seq_len=32, lr=0.5)
    patch, state = train(model, COORDS, [(1, 5)], seqs, cfg, Track(progress=EachStep(lambda s, loss: losses.append((s, loss)))))
    assert [s for s, _ in losses] == list(range(1, 31))
    first, last = losses[0][1], losses[-1][1]
    assert math.isfinite(first) and first > 0.1  # the ablation hurts: there is something to repair
    assert last < 0.5 * first
    assert state.steps == 30 and state.final_loss == last and state.resumed_from is None
    assert state.teacher_cached  # 30 * 8 sequences > 64, and they fit the cache
    # The model is exactly as it was and carries nothing; the returned patch is frozen and off.
    assert_identical(model, before)
    assert hook_count(model) == 0 and not patch.active
    assert all(not v.requires_grad for v in patch.vectors)
    # What it learnt points at the ablated weight: its largest entry is the super weight's column.
    d = patch.vectors[0]
    assert int(d.abs().argmax()) == PLANT[2] and d[PLANT[2]] > 0
    # Held-out repair. KL closure is the meaningful number on a random model (its NLL gap is ~0.03 nats and
    # noise-dominated, so nll_gap recovery is not asserted).
    res = measure(model, ids["eval"], {"broken": Ablation(model, COORDS),
                                       "patched": Compose(Ablation(model, COORDS), patch)}, max_length=128)
    rec = recovery(res["base"], res["broken"], res["patched"])
    assert res["broken"].kl > 0.1
    assert res["patched"].kl < res["broken"].kl
    assert rec.kl > 0.3, rec
    assert_identical(model, before)
    assert hook_count(model) == 0


def test_teacher_cache_and_no_cache_agree_up_to_fp16_targets(seqs):
    model = planted(PLANT)
    small = seqs[:24]
    out = {}
    for mb in (2048, 0):
        cfg = FirstOrderConfig(steps=9, batch_size=8, seq_len=32, lr=0.5, teacher_cache_mb=mb)
        patch, state = train(model, COORDS, [(1, 5)], small, cfg)
        assert state.teacher_cached == (mb > 0)
        out[mb] = patch.vectors[0]
    # Not bit-equal: the cached path rounds the teacher's log-probs through fp16 (on first use too, so a
    # resumed run sees the same targets). Measured: max |diff| ~1e-3 on entries of size ~3.
    assert out[0].abs().max() > 1.0
    torch.testing.assert_close(out[2048], out[0], rtol=0, atol=1e-2)


def test_a_cache_too_small_for_the_set_is_not_used(seqs):
    model = planted(PLANT)
    cfg = FirstOrderConfig(steps=9, batch_size=8, seq_len=32, lr=0.5, teacher_cache_mb=1)  # 64*32*512*2 B = 2 MiB
    _, state = train(model, COORDS, [(1, 5)], seqs[:64], cfg)
    assert not state.teacher_cached
    cfg = FirstOrderConfig(steps=2, batch_size=8, seq_len=32, lr=0.5)  # each sequence seen at most once
    _, state = train(model, COORDS, [(1, 5)], seqs[:24], cfg)
    assert not state.teacher_cached


def test_log_and_checkpoint_of_a_plain_run(tmp_path, seqs):
    model = planted(PLANT)
    cfg = FirstOrderConfig(steps=5, batch_size=4, seq_len=32, lr=0.5, schedule="constant", warmup=2)
    patch, _ = train(model, COORDS, [(1, 5)], seqs[:16], cfg, Track(run_dir=tmp_path, checkpoint_every=2))
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in log] == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 5  # the last step is always checkpointed
    assert torch.equal(ckpt["vectors"][0], patch.vectors[0])
    assert ckpt["config"] == cfg.model_dump()


# ------------------------------------------------------------------------------------------ batch_indices


@pytest.mark.parametrize("n, batch", [(10, 5), (10, 3), (7, 8), (1, 2)])
def test_batch_indices_cover_each_index_once_per_epoch(n, batch):
    epochs = 4
    steps = -(-epochs * n // batch)
    flat = [i for step in range(steps) for i in batch_indices(step, batch, n, seed=1)]
    assert all(len(batch_indices(s, batch, n, 1)) == batch for s in range(3))
    perms = [flat[e * n:(e + 1) * n] for e in range(epochs)]
    for p in perms:
        assert sorted(p) == list(range(n))
    if n >= 5:
        assert len({tuple(p) for p in perms}) > 1  # a fresh order each epoch


def test_batch_indices_are_a_pure_function_of_step_batch_n_seed():
    n, batch = 13, 4
    state = torch.get_rng_state()
    forward = [batch_indices(s, batch, n, 2) for s in range(20)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither used nor disturbed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        backward = [batch_indices(s, batch, n, 2) for s in reversed(range(20))][::-1]
    epoch_order.cache_clear()  # bypass the memo
    fresh = [batch_indices(s, batch, n, 2) for s in range(20)]
    assert forward == backward == fresh
    assert forward != [batch_indices(s, batch, n, 3) for s in range(20)]
    assert [i for b in forward for i in b] != [i % n for i in range(20 * batch)]  # actually shuffled


# --------------------------------------------------------------------------------------------------- loss


def _logits(seed, shape=(2, 6, 11)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_loss_is_zero_for_the_teacher_itself(kl, temperature):
    cfg = FirstOrderConfig(kl=kl, temperature=temperature)
    logits = _logits(0)
    teacher_lp = (logits / temperature).log_softmax(-1)
    mask = torch.ones(2, 6)
    assert kl_loss(teacher_lp, logits, mask, cfg).item() == 0.0
    assert kl_loss(teacher_lp, _logits(1), mask, cfg).item() > 0.01


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_kl_loss_ignores_masked_positions(kl):
    cfg = FirstOrderConfig(kl=kl, temperature=1.5)
    teacher_lp = (_logits(0) / 1.5).log_softmax(-1)
    student = _logits(1)
    mask = torch.ones(2, 6, dtype=torch.long)  # integer, like an attention mask / train's default
    mask[0, 4:] = 0
    mask[1, 5:] = 0
    loss = kl_loss(teacher_lp, student, mask, cfg)
    other = student.clone()
    other[mask == 0] = _logits(2)[mask == 0] * 10
    assert torch.equal(kl_loss(teacher_lp, other, mask, cfg), loss)
    other_teacher = teacher_lp.clone()
    other_teacher[mask == 0] = (_logits(3)[mask == 0]).log_softmax(-1)
    assert torch.equal(kl_loss(other_teacher, student, mask, cfg), loss)
    # ... but a change at a real position does change it, and the value is the mean over real positions.
    changed = student.clone()
    changed[0, 0, 3] += 5  # one logit: adding to all of a position's logits would change nothing
    assert kl_loss(teacher_lp, changed, mask, cfg) != loss
    s_lp = (student / 1.5).log_softmax(-1)
    p, q = (teacher_lp, s_lp) if kl == "forward" else (s_lp, teacher_lp)
    per_token = (p.exp() * (p - q)).sum(-1)
    expected = per_token[mask.bool()].mean() * 1.5**2
    torch.testing.assert_close(loss, expected)


# ------------------------------------------------------------------------------------------------- resume

RESUME_SCRIPT = textwrap.dedent('''
    from tiny import planted
    # Imports torch / transformers once, then runs each training in a forked child (a fresh process as far
    # as training is concerned: this parent never trains or runs a forward), so that three runs cost one
    # interpreter start (~6 s of imports) instead of three.
    import json, os, signal, sys, traceback
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from superweight.core.coords import WeightCoord
    from superweight.progress import EachStep
    from superweight.engine.config import FirstOrderConfig
    from superweight.engine.train import Track, train

    base, sequences = Path(sys.argv[1]), torch.load(sys.argv[2])
    planted((1, 5, 7))  # resolve transformers' lazy imports here once, not in every child


    def run(run_dir, resume, kill_at):
        model = planted((1, 5, 7))
        cfg = FirstOrderConfig(steps=12, batch_size=4, seq_len=16, lr=0.3, weight_decay=0.01, warmup=2,
                               init="random", seed=3)

        def on_step(step, loss):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        patch, state = train(model, [WeightCoord(layer=1, row=5, col=7)], [(1, 5), (3, 5)], sequences, cfg,
                             Track(run_dir=run_dir, checkpoint_every=3, resume=resume, progress=EachStep(on_step)))
        assert state.teacher_cached and state.resumed_from == (6 if resume else None), state
        torch.save([v.detach().clone() for v in patch.vectors], run_dir / "patch.pt")


    for name, run_dir, resume, kill_at in [("killed", base / "killed", False, 7),
                                           ("resumed", base / "killed", True, None),
                                           ("full", base / "full", False, None)]:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(run_dir, resume, kill_at)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"run": name, "returncode": os.waitstatus_to_exitcode(status)}), flush=True)
        if name == "killed":  # what the kill left behind, before the resume touches it
            ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
            log = [json.loads(ln)["step"] for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
            print(json.dumps({"ckpt_step": ckpt["step"], "log_steps": log,
                              "patch_saved": (run_dir / "patch.pt").exists()}), flush=True)
''')


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the resume driver forks")
def test_a_killed_run_resumes_bit_for_bit(tmp_path, ids):
    script = tmp_path / "resume_run.py"
    script.write_text(RESUME_SCRIPT)
    seqs_path = tmp_path / "seqs.pt"
    # 16 sequences, batch 4, 12 steps: each is seen 3 times, so the teacher cache is in use and the resumed
    # run (empty cache, restarting in epoch 2) must rebuild exactly the targets the uninterrupted run cached.
    torch.save(corpora.pack(ids["train"], 16)[:16].clone(), seqs_path)
    for d in ("killed", "full"):
        (tmp_path / d).mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(TESTS_DIR), os.environ.get("PYTHONPATH")] if p)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(seqs_path)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    report = {r["run"]: r["returncode"] for r in lines if "run" in r}
    assert report == {"killed": -signal.SIGKILL, "resumed": 0, "full": 0}, proc.stderr
    after_kill = next(r for r in lines if "ckpt_step" in r)
    assert after_kill["ckpt_step"] == 6
    assert after_kill["log_steps"] == [1, 2, 3, 4, 5, 6, 7]  # step 7 was logged but not checkpointed
    assert not after_kill["patch_saved"]

    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"
    got = torch.load(killed_dir / "patch.pt")
    want = torch.load(full_dir / "patch.pt")
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert want[0].abs().max() > 0.1  # it trained
    log, full_log = read_log(killed_dir), read_log(full_dir)
    assert [r["step"] for r in log] == list(range(1, 13))  # the resume dropped the unsaved step-7 line
    assert [r["loss"] for r in log] == [r["loss"] for r in full_log]
    assert [r["lr"] for r in log] == [r["lr"] for r in full_log]
    assert torch.load(killed_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 12


def test_resume_with_other_settings_or_nothing_to_resume_is_a_usage_error(tmp_path, seqs):
    model = planted(PLANT)
    before = snapshot(model)
    cfg = FirstOrderConfig(steps=3, batch_size=4, seq_len=32, lr=0.5)
    train(model, COORDS, [(1, 5)], seqs[:8], cfg, Track(run_dir=tmp_path, checkpoint_every=2))
    with pytest.raises(UsageError, match="other training settings"):
        train(model, COORDS, [(1, 5)], seqs[:8], revalidated(cfg, lr=0.4), Track(run_dir=tmp_path, resume=True))
    with pytest.raises(UsageError, match="nothing to resume"):
        train(model, COORDS, [(1, 5)], seqs[:8], cfg, Track(run_dir=None, resume=True))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]  # failed resumes touched nothing
    assert_identical(model, before)
    assert hook_count(model) == 0


def test_resume_before_the_first_checkpoint_starts_at_step_0(tmp_path, seqs):
    model = planted(PLANT)
    cfg = FirstOrderConfig(steps=3, batch_size=4, seq_len=32, lr=0.5)
    want, _ = train(model, COORDS, [(1, 5)], seqs[:8], cfg, Track(run_dir=tmp_path / "fresh"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train_log.jsonl").write_text('{"step": 1, "loss": 0.5, "lr": 0.5, "seconds": 0.1}\n{"st')
    got, state = train(model, COORDS, [(1, 5)], seqs[:8], cfg, Track(run_dir=tmp_path / "empty", resume=True))
    assert state.resumed_from == 0
    assert torch.equal(got.vectors[0], want.vectors[0])
    assert [r["step"] for r in read_log(tmp_path / "empty")] == [1, 2, 3]  # the stale line and the torn one went


def test_resume_of_a_finished_run_is_a_no_op(tmp_path, seqs):
    model = planted(PLANT)
    cfg = FirstOrderConfig(steps=3, batch_size=4, seq_len=32, lr=0.5)
    first, _ = train(model, COORDS, [(1, 5)], seqs[:8], cfg, Track(run_dir=tmp_path))
    seconds = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["seconds"]
    again, state = train(model, COORDS, [(1, 5)], seqs[:8], cfg, Track(run_dir=tmp_path, resume=True))
    assert state.resumed_from == 3
    # The training record survives: the last loss and the seconds come from the checkpoint, not NaN and ~0.
    assert state.final_loss == read_log(tmp_path)[-1]["loss"] and state.seconds >= seconds > 0
    assert torch.equal(first.vectors[0], again.vectors[0])
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]


def test_resume_with_other_rows_is_a_usage_error(tmp_path, seqs):
    model = planted(PLANT)
    cfg = FirstOrderConfig(steps=3, batch_size=4, seq_len=32, lr=0.5)
    train(model, COORDS, [(1, 5)], seqs[:8], cfg, Track(run_dir=tmp_path, checkpoint_every=2))
    with pytest.raises(UsageError):
        train(model, COORDS, [(1, 6)], seqs[:8], cfg, Track(run_dir=tmp_path, resume=True))


def test_a_fresh_run_starts_a_fresh_log(tmp_path, seqs):
    model = planted(PLANT)
    cfg = FirstOrderConfig(steps=3, batch_size=4, seq_len=32, lr=0.5)
    train(model, COORDS, [(1, 5)], seqs[:8], cfg, Track(run_dir=tmp_path))
    train(model, COORDS, [(1, 5)], seqs[:8], cfg, Track(run_dir=tmp_path))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]


# ------------------------------------------------------------------------------- never worse than no patch

def test_verdicts():
    from superweight.schema.record import Recovery
    from superweight.measure.recovery import verdict_of

    assert verdict_of(Recovery(nll_gap=0.99, kl=0.95)) == "repaired"
    assert verdict_of(Recovery(nll_gap=0.99, kl=0.5)) == "partial"
    assert verdict_of(Recovery(nll_gap=1.2, kl=-0.4)) == "failed"  # closer in NLL, further from the intact model
    assert verdict_of(Recovery(nll_gap=None, kl=0.95)) == "repaired"


@pytest.mark.parametrize("recipe, lr", [("balanced", 300.0), ("quick", 300.0), ("lbfgs", 1e4)])
def test_an_lr_far_too_high_backs_off_and_is_never_worse_than_no_patch(recipe, lr):
    from superweight.engine.config import RECIPES, configure
    from tiny import planted

    model = planted((1, 5, 7))
    seqs = torch.randint(2, 300, (12, 32), generator=torch.Generator().manual_seed(0))
    cfg = configure(RECIPES[recipe], lr=lr, budget=8, seq_len=32)
    patch, state = train(model, [WeightCoord(layer=1, row=5, col=7)], [(1, 5)], seqs, cfg)
    c = state.check
    assert c is not None and c.best_kl <= c.broken_kl and torch.isfinite(patch.vectors[0]).all()
    if recipe != "lbfgs":  # far too high: later patches did worse, and the handed-over one is an earlier one
        assert c.backoffs >= 1 or c.best_step < cfg.budget
    else:  # L-BFGS trains no further from the best patch: nothing is counted as a back-off
        assert c.backoffs == 0


def test_the_check_keeps_no_patch_when_every_patch_does_harm(monkeypatch):
    """A patch that only ever hurts is not handed over: the best patch checked is zero."""
    from superweight.engine.config import RECIPES
    from tiny import planted

    model = planted((1, 5, 7))
    seqs = torch.randint(2, 300, (12, 32), generator=torch.Generator().manual_seed(0))
    cfg = revalidated(RECIPES["balanced"], lr=1e6, steps=4, seq_len=32)
    patch, state = train(model, [WeightCoord(layer=1, row=5, col=7)], [(1, 5)], seqs, cfg)
    if state.check.best_step == 0:
        assert patch.vectors[0].abs().max() == 0
    assert state.check.best_kl <= state.check.broken_kl


def test_lbfgs_keeps_a_far_off_first_step_only_where_it_does_as_well_as_lr_1():
    """lr 1e4 and 1e-4 fall back to lr 1's first step: the same patch as the default, to rounding."""
    from superweight.engine.config import RECIPES
    from superweight.engine.optimize import _first_lr
    from tiny import planted

    model = planted((1, 5, 7))
    seqs = torch.randint(2, 300, (12, 32), generator=torch.Generator().manual_seed(0))
    coords = [WeightCoord(layer=1, row=5, col=7)]
    patches = {lr: train(model, coords, [(1, 5)], seqs, revalidated(RECIPES["lbfgs"], lr=lr, seq_len=32))[0]
               for lr in (1.0, 1e4, 1e-4)}
    for lr in (1e4, 1e-4):
        assert torch.allclose(patches[lr].vectors[0], patches[1.0].vectors[0], rtol=1e-3, atol=1e-4)
    # The probe keeps an lr that does at least as well, and leaves the parameters where they were.
    x = torch.nn.Parameter(torch.tensor([3.0, -2.0]))

    def closure():
        x.grad = None
        loss = ((x - torch.tensor([1.0, 1.0])) ** 2).sum()
        loss.backward()
        return loss.detach()

    assert _first_lr(closure, [x], 2.0) == 2.0  # t = 1/‖g‖₁ = 1/10: a step of 0.2 g lands nearer the minimum
    assert _first_lr(closure, [x], 1e3) == 1.0 and torch.equal(x.data, torch.tensor([3.0, -2.0]))
