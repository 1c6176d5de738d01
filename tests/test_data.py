"""io/corpora.py: corpora, their paragraph-level split, tokenisation, sliding windows and packing."""

from __future__ import annotations

import zlib

import pytest
import torch

import tiny
from superweight.errors import CorpusError, SuperweightError, UsageError
from superweight.io import corpora

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def paragraphs(text: str) -> list[str]:
    return text.split("\n\n")


# -------------------------------------------------------------------------------------------------- pydoc

@pytest.fixture(scope="module")
def pydoc_splits() -> dict[str, str]:
    return {s: corpora.load_text("pydoc", s) for s in ("train", "eval", "all")}


def test_pydoc_split_is_deterministic(pydoc_splits):
    for split, text in pydoc_splits.items():
        assert corpora.load_text("pydoc", split) == text
    assert corpora.load_text("pydoc") == pydoc_splits["eval"]  # eval is the default split


def test_pydoc_split_is_a_disjoint_paragraph_partition(pydoc_splits):
    from pydoc_data.topics import topics

    train, eval_, all_ = (paragraphs(pydoc_splits[s]) for s in ("train", "eval", "all"))
    assert len(all_) > 1000
    assert len(train) + len(eval_) == len(all_)
    assert set(train).isdisjoint(eval_)  # not even a repeated paragraph sits in both
    assert set(train) | set(eval_) == set(all_)
    # Each split keeps the corpus order (is a subsequence of `all`).
    for split in (train, eval_):
        rest = iter(all_)
        assert all(any(p == q for q in rest) for p in split)
    # The documented rule, and about 10% of paragraphs in eval.
    assert all(zlib.crc32(p.encode()) % 10 == 0 for p in eval_)
    assert all(zlib.crc32(p.encode()) % 10 != 0 for p in train)
    assert 0.05 <= len(eval_) / len(all_) <= 0.15
    # The corpus is the whole of pydoc_data.topics, read in sorted key order.
    first = topics[sorted(topics)[0]].strip().split("\n\n")[0].strip()
    assert all_[0] == first
    assert len(pydoc_splits["all"]) > 300_000
    assert all(p.strip() == p and p for p in all_)


# ---------------------------------------------------------------------------------------------- text:PATH

def _write_paragraphs(path, tag: str, n: int) -> list[str]:
    paras = [f"{tag} paragraph {i}: some words, line one.\nand line two of {tag} {i}." for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n\n".join(paras) + "\n", encoding="utf-8")  # extra blank lines are fine
    return paras


def test_text_file(tmp_path):
    paras = _write_paragraphs(tmp_path / "a.txt", "alpha", 60)
    spec = f"text:{tmp_path / 'a.txt'}"
    assert paragraphs(corpora.load_text(spec, "all")) == paras
    train, eval_ = paragraphs(corpora.load_text(spec, "train")), paragraphs(corpora.load_text(spec, "eval"))
    assert set(train).isdisjoint(eval_) and sorted(train + eval_) == sorted(paras)
    assert eval_ == [p for p in paras if zlib.crc32(p.encode()) % 10 == 0]


def test_text_file_crlf(tmp_path):
    (tmp_path / "w.txt").write_bytes(b"first para\r\nsame para\r\n\r\nsecond para\r\n")
    assert paragraphs(corpora.load_text(f"text:{tmp_path / 'w.txt'}", "all")) == ["first para\nsame para", "second para"]


def test_text_directory_and_glob(tmp_path):
    a = _write_paragraphs(tmp_path / "corpus" / "a.txt", "alpha", 5)
    b = _write_paragraphs(tmp_path / "corpus" / "sub" / "b.txt", "beta", 5)
    c = _write_paragraphs(tmp_path / "corpus" / "c.md", "gamma", 5)
    # A directory: every *.txt below it, in sorted path order; other extensions ignored.
    assert paragraphs(corpora.load_text(f"text:{tmp_path / 'corpus'}", "all")) == a + b
    # A glob: exactly what it matches.
    assert paragraphs(corpora.load_text(f"text:{tmp_path / 'corpus' / '*.md'}", "all")) == c
    assert paragraphs(corpora.load_text(f"text:{tmp_path / 'corpus' / '*'}", "all")) == a + c  # files only
    assert paragraphs(corpora.load_text(f"text:{tmp_path / 'corpus' / '**' / '*.txt'}", "all")) == a + b


def _one_line_error(exc_type, fn, *args) -> str:
    with pytest.raises(exc_type) as err:
        fn(*args)
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_text_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    assert str(missing) in _one_line_error(CorpusError, corpora.load_text, f"text:{missing}", "all")
    _one_line_error(CorpusError, corpora.load_text, f"text:{tmp_path / 'nothing-*.txt'}", "all")
    (tmp_path / "empty.txt").write_text("")
    _one_line_error(CorpusError, corpora.load_text, f"text:{tmp_path / 'empty.txt'}", "all")
    (tmp_path / "blank.txt").write_text("\n\n  \n\t\n")
    _one_line_error(CorpusError, corpora.load_text, f"text:{tmp_path / 'blank.txt'}", "eval")
    (tmp_path / "nodir").mkdir()
    (tmp_path / "nodir" / "x.md").write_text("not a txt")
    _one_line_error(CorpusError, corpora.load_text, f"text:{tmp_path / 'nodir'}", "all")
    # Text exists, but none of it falls in the requested split.
    para = next(f"only paragraph {i}" for i in range(100) if zlib.crc32(f"only paragraph {i}".encode()) % 10)
    (tmp_path / "one.txt").write_text(para)
    assert corpora.load_text(f"text:{tmp_path / 'one.txt'}", "train") == para
    assert "--split all" in _one_line_error(CorpusError, corpora.load_text, f"text:{tmp_path / 'one.txt'}", "eval")
    assert CorpusError.exit_code == 1 and issubclass(CorpusError, SuperweightError)


def test_unknown_corpus_or_split():
    msg = _one_line_error(UsageError, corpora.load_text, "bogus", "eval")
    assert "bogus" in msg and "pydoc" in msg
    msg = _one_line_error(UsageError, corpora.load_text, "pydoc", "validation")
    assert "validation" in msg and "train" in msg
    _one_line_error(UsageError, corpora.load_text, "pydoc", "")
    assert UsageError.exit_code == 2


def test_unknown_split_wikitext2():
    pytest.importorskip("datasets")
    _one_line_error(UsageError, corpora.load_text, "wikitext2", "dev")


# -------------------------------------------------------------------------------------------------- tokenize

def test_tokenize():
    tok = tiny.tiny_tokenizer()
    text = corpora.load_text("pydoc", "eval")
    ids = corpora.tokenize(tok, text, 300)
    assert ids.dtype == torch.long and ids.shape == (300,)
    full = tok(text[:5000], add_special_tokens=False)["input_ids"]
    assert ids.tolist() == full[:300]
    assert int(ids.max()) < len(tok)
    short = corpora.tokenize(tok, "def f(x): return x")
    assert short.tolist() == tok("def f(x): return x", add_special_tokens=False)["input_ids"]
    for bad in (0, 1, -5):
        with pytest.raises(UsageError):
            corpora.tokenize(tok, text, bad)
    with pytest.raises(CorpusError):
        corpora.tokenize(tok, "a")


# -------------------------------------------------------------------------------------------------- windows

def hf_reference(n: int, max_length: int, stride: int) -> list[list[int]]:
    """Targets scored per window by HF's "perplexity of fixed-length models" loop, written out plainly."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end  # labels are the last trg_len tokens of the window...
        # ...and the model shifts them, so position `begin` itself is never a target.
        out.append([t for t in range(end - trg_len, end) if t > begin])
        prev_end = end
        if end == n:
            break
    return [w for w in out if w]


def scored(w: corpora.Window) -> list[int]:
    return [t for t in range(w.begin + 1, w.end) if t >= w.score_from]


COMBOS = [
    (100, 16, 16), (100, 16, 8), (100, 16, 1), (100, 16, 15), (101, 16, 5), (17, 16, 4), (16, 16, 16),
    (17, 16, 16), (15, 16, 16), (2, 2, 1), (2, 2, 2), (5, 2, 2), (5, 2, 1), (1000, 128, 37), (9, 3, 2),
]


@pytest.mark.parametrize("n, max_length, stride", COMBOS)
def test_windows_match_hf_recipe(n, max_length, stride):
    from superweight.measure.metrics import n_scored

    wins = corpora.windows(n, max_length, stride)
    assert wins
    counts = [0] * n
    for w in wins:
        assert 0 <= w.begin < w.end <= n
        assert 2 <= w.end - w.begin <= max_length
        assert w.n_scored == len(scored(w)) > 0
        for t in scored(w):
            counts[t] += 1
    assert counts[0] == 0
    assert max(counts) == 1  # nothing is scored twice
    assert [w.begin for w in wins] == sorted({w.begin for w in wins})
    assert wins[-1].end == n or stride == max_length
    if stride < max_length:
        assert counts[1:] == [1] * (n - 1)  # every target 1..n-1 exactly once
    else:
        # Disjoint windows (HF's recipe): the first token of each window has no context and is not scored.
        unscored = {t for t in range(1, n) if counts[t] == 0}
        assert unscored == {w.begin for w in wins if w.begin > 0} | ({n - 1} if n % stride == 1 and n > 1 else set())
    assert [scored(w) for w in wins] == hf_reference(n, max_length, stride)
    assert n_scored(n, max_length, stride) == sum(counts)


def test_windows_overlap_gives_context():
    wins = corpora.windows(20, 8, 4)
    assert [(w.begin, w.end, w.score_from) for w in wins] == [(0, 8, 0), (4, 12, 8), (8, 16, 12), (12, 20, 16)]


def test_windows_short_stream():
    assert [(w.begin, w.end) for w in corpora.windows(5, 512, 512)] == [(0, 5)]
    assert [(w.begin, w.end) for w in corpora.windows(5, 512, 3)] == [(0, 5)]
    assert corpora.windows(1, 4, 4) == [] and corpora.windows(0, 4, 4) == []


@pytest.mark.parametrize("max_length, stride", [(1, 1), (0, 1), (-3, 1), (8, 0), (8, -1), (8, 9)])
def test_windows_bad_arguments(max_length, stride):
    with pytest.raises(UsageError):
        corpora.windows(100, max_length, stride)


# -------------------------------------------------------------------------------------------------- pack

def test_pack():
    ids = torch.arange(23)
    rows = corpora.pack(ids, 5)
    assert rows.shape == (4, 5)
    assert rows.flatten().tolist() == list(range(20))  # ragged tail dropped, order kept
    assert corpora.pack(torch.arange(5), 5).tolist() == [[0, 1, 2, 3, 4]]
    assert corpora.pack(torch.arange(40)[::2], 4).tolist() == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18, 20, 22],
                                                           [24, 26, 28, 30], [32, 34, 36, 38]]
    with pytest.raises(CorpusError):
        corpora.pack(torch.arange(4), 5)


def test_check_windows():
    corpora.check_windows(2)
    corpora.check_windows(512, None)
    corpora.check_windows(512, 1)
    corpora.check_windows(512, 512)
    for max_length, stride in [(1, None), (0, None), (8, 0), (8, 9), (8, -2)]:
        with pytest.raises(UsageError):
            corpora.check_windows(max_length, stride)


# ------------------------------------------------------------------------------- known bugs (see report)

def test_tokenize_long_tokens_still_gives_max_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"{'x' * 20}{i}" for i in range(50)]  # one 21-22 character token each
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": len(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    text = " ".join(words * 20)  # 1000 tokens
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1000
    assert corpora.tokenize(tok, text, 200).numel() == 200


def test_text_directory_skips_subdirectories_named_txt(tmp_path):
    a = _write_paragraphs(tmp_path / "corpus" / "a.txt", "alpha", 3)
    b = _write_paragraphs(tmp_path / "corpus" / "old.txt" / "b.txt", "beta", 3)
    assert paragraphs(corpora.load_text(f"text:{tmp_path / 'corpus'}", "all")) == a + b


# --------------------------------------------------------------------------------------------------- BOS

def test_windows_with_bos_score_every_token_once():
    ws = corpora.windows(20, 8, bos=corpora.Bos.first(0))
    assert all(w.bos and w.end - w.begin <= 7 for w in ws)
    assert [(w.begin, w.end) for w in ws] == [(0, 7), (7, 14), (14, 20)]
    assert sum(w.end - w.score_from for w in ws) == 20


def test_pack_with_bos_starts_every_row_with_it():
    rows = corpora.pack(torch.arange(10, 30), 5, bos=corpora.Bos.first(1))
    assert rows.shape == (5, 5) and (rows[:, 0] == 1).all()
    assert rows[0, 1:].tolist() == [10, 11, 12, 13]


class _Tok:
    def __init__(self, bos_id, adds):
        self.bos_token_id, self._adds = bos_id, adds

    def __call__(self, text, add_special_tokens=True):
        ids = [5, 6]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self._adds else []) + ids}


@pytest.mark.parametrize("mode, adds, want", [("auto", True, 2), ("auto", False, None), ("on", False, 2),
                                              ("off", True, None)])
def test_bos_token_modes(mode, adds, want):
    assert corpora.bos_token(_Tok(2, adds), mode) == want


def test_bos_on_without_a_bos_token_is_a_usage_error():
    with pytest.raises(UsageError):
        corpora.bos_token(_Tok(None, False), "on")


def test_bos_is_one_checked_value_from_the_option_to_the_windows():
    assert corpora.Bos("auto").resolve(_Tok(2, True)) == corpora.Bos("auto", 2)
    assert corpora.Bos("on").resolve(_Tok(2, False)).on and not corpora.Bos("off").resolve(_Tok(2, True)).on
    with pytest.raises(UsageError, match="unknown --bos 'bogus': use auto, on, off"):
        corpora.Bos("bogus")
    assert corpora.Bos.first(None) == corpora.NO_BOS and corpora.Bos.first(3) == corpora.Bos("on", 3)


def test_training_sequences_start_every_row_with_the_bos(monkeypatch):
    from superweight.engine.config import FirstOrderConfig
    from superweight.engine.train import training_sequences

    tok = tiny.tiny_tokenizer()
    cfg = FirstOrderConfig(seq_len=16, train_tokens=256)
    plain, mask = training_sequences(tok, "pydoc", cfg)
    rows, mask_bos = training_sequences(tok, "pydoc", cfg, bos=corpora.Bos.first(0))
    assert mask is None and mask_bos is None and plain.shape[1] == rows.shape[1] == 16
    assert (rows[:, 0] == 0).all()
    assert rows[:, 1:].flatten().tolist() == plain.flatten()[: rows.shape[0] * 15].tolist()  # the same text

    # "lines" data (wikitext2's lines, one a row): the BOS first, then the line; the BOS counts as a real token.
    monkeypatch.setattr(corpora, "load_text", lambda corpus, split: "the first line\n\nand a second line here\n")
    cfg = FirstOrderConfig(seq_len=8, data="lines")
    lines, mask = training_sequences(tok, "wikitext2", cfg)
    lines_bos, mask_bos = training_sequences(tok, "wikitext2", cfg, bos=corpora.Bos.first(0))
    assert lines.shape == lines_bos.shape == (2, 8) and (lines_bos[:, 0] == 0).all()
    for i in range(2):
        n = int(mask[i].sum())
        assert int(mask_bos[i].sum()) == min(n + 1, 8) and mask_bos[i, 0] == 1
        assert lines_bos[i, 1 : n + 1].tolist() == lines[i, : min(n, 7)].tolist()
