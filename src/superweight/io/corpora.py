"""Corpora, their train/eval split, and token windows.

Corpus specs:
- `pydoc` (default): the Python standard library's documentation topics (`pydoc_data.topics`), ~465k
  characters, no download. Split by paragraph: a blank-line-separated paragraph is in `eval` when
  crc32(paragraph) % 10 == 0, else in `train` (so ~10% eval, spread over all topics, and a paragraph that
  repeats can never sit in both splits). Topics are read in sorted key order.
- `wikitext2`: `wikitext` / `wikitext-2-raw-v1` through `datasets` (needs the optional extra and network or a
  warm cache). Splits are the dataset's own: `train`, `validation` (`eval` means validation), `test`.
- `text:PATH`: a text file, a directory (every `*.txt` below it) or a glob; split by paragraph like pydoc.

Every split also accepts `all`. Text is joined with blank lines, tokenised once without special tokens and
cut into windows the way HF's "perplexity of fixed-length models" guide does.

BOS: models whose tokenizer starts every text with a BOS token (Gemma, Llama, Mistral) never saw a
sequence without it, and score text very differently without it (Gemma-3-270M: PPL 48 without, 19 with, on the
same targets). `Bos` carries the policy (`--bos auto|on|off`, auto follows the tokenizer) and the token it gives
(`bos_token`); `windows(..., bos=)` and `pack(..., bos=)` then start every window and training row with it, and the
first text token of a window is scored from the BOS alone (lm-eval's rolling windows do the same).
"""

from __future__ import annotations

import glob
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from superweight.errors import CorpusError, UsageError
from superweight.settings import DEFAULT_CORPUS  # noqa: F401 (the corpora's default)

SPLITS = ("train", "eval", "all")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _hash_split(paragraphs: list[str], split: str) -> list[str]:
    if split == "all":
        return paragraphs
    in_eval = [zlib.crc32(p.encode("utf-8")) % 10 == 0 for p in paragraphs]
    return [p for p, e in zip(paragraphs, in_eval) if e == (split == "eval")]


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _text_files(path: str) -> list[Path]:
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        files = sorted(p for p in Path(expanded).rglob("*.txt") if p.is_file())
    elif os.path.isfile(expanded):
        files = [Path(expanded)]
    else:
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if not files:
        raise CorpusError(f"no such text file, directory or glob: {path}")
    return files


def _read_utf8(path: Path, corpus: str) -> str:
    """A text file's contents; a file that is not UTF-8 text (a bad byte, or a NUL as binaries have) is an
    error naming it and the first offending byte's offset, never replacement characters scored as text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read corpus '{corpus}': {exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                          f"({exc.reason})") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise CorpusError(f"{path} is not UTF-8 text: byte 0x00 at offset {nul} (a binary file?)")
    return text.removeprefix("\ufeff")  # a byte-order mark is not text


def _wikitext(split: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError("corpus 'wikitext2' needs the datasets package: pip install 'superweight[datasets]'") from exc
    hf_split = {"eval": "validation", "all": "train+validation+test"}.get(split, split)
    base_split = hf_split.split("[")[0]  # datasets' slicing syntax, e.g. train[:2%], is passed through
    if base_split not in {"train", "validation", "test", "train+validation+test"}:
        raise UsageError(f"unknown split '{split}' for wikitext2: use train, validation (eval), test or all")
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    except Exception as exc:  # network, cache and hub errors all mean "not available here"
        raise CorpusError(f"could not load wikitext-2-raw-v1 ({hf_split}): {str(exc).splitlines()[0]}") from exc
    return "".join(ds["text"])


def load_text(corpus: str = DEFAULT_CORPUS, split: str = "eval") -> str:
    """The text of one split of a corpus, as a single string; an error if it is missing or empty."""
    if corpus == "wikitext2":
        text = _wikitext(split)
    else:
        if split not in SPLITS:
            raise UsageError(f"unknown split '{split}': use {', '.join(SPLITS)}")
        if corpus == "pydoc":
            raw = _pydoc_text()
        elif corpus.startswith("text:"):
            files = _text_files(corpus[len("text:"):])
            raw = "\n\n".join(_read_utf8(f, corpus) for f in files)
            if not raw.strip():
                raise CorpusError(f"corpus '{corpus}' is empty")
        else:
            raise UsageError(f"unknown corpus '{corpus}': use pydoc, wikitext2 or text:PATH")
        text = "\n\n".join(_hash_split(_paragraphs(raw), split))
    if not text.strip():
        raise CorpusError(f"corpus '{corpus}' has no text in split '{split}' (try --split all)")
    return text


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-d LongTensor of token ids, truncated to `max_tokens`."""
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"max_tokens must be at least 2, got {max_tokens}")
    if max_tokens is None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        # Tokenising all of a large corpus to keep a few thousand tokens is wasted work: cut the text at
        # ~8 characters a token (generous for English and code) and widen the cut if that was too short.
        cut = max_tokens * 8
        while True:
            ids = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
            if len(ids) > max_tokens or cut >= len(text):
                break
            cut *= 4
        ids = ids[:max_tokens]
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() < 2:
        raise CorpusError("the corpus gives fewer than 2 tokens")
    return ids


BOS_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Bos:
    """The text protocol's BOS, one value from --bos to the windows: `mode` as asked (auto, on or off) and `token`,
    the id every window and training row starts with (None: none). `Bos(mode)` checks the mode; `resolve` works the
    token out from a tokenizer (io/models.load does it once, into Loaded.bos).

        Bos("on").resolve(tokenizer)    # Bos(mode='on', token=1)
        Bos.first(0)                    # a BOS of id 0 first in every window, whatever the tokenizer (tests)
    """

    mode: str = "auto"
    token: int | None = None

    def __post_init__(self):
        if self.mode not in BOS_MODES:
            raise UsageError(f"unknown --bos '{self.mode}': use {', '.join(BOS_MODES)}")
        if self.mode == "off" and self.token is not None:
            raise UsageError("--bos off puts no token first")

    @property
    def on(self) -> bool:
        """Whether windows and rows start with a BOS token."""
        return self.token is not None

    def resolve(self, tokenizer) -> Bos:
        """This mode with the token it gives on `tokenizer` (bos_token)."""
        return Bos(self.mode, bos_token(tokenizer, self.mode))

    @classmethod
    def first(cls, token: int | None) -> Bos:
        """The BOS that puts `token` first (mode on), or none (mode off) when it is None."""
        return cls("off") if token is None else cls("on", int(token))


NO_BOS = Bos("off")  # no token first: the default of every function that windows or packs text


def bos_token(tokenizer, mode: str = "auto") -> int | None:
    """The token id every window and training row starts with, or None. `auto`: the BOS when the tokenizer
    puts one first by default (tokenizer(text) starts with bos_token_id); `on`: always the BOS; `off`: none."""
    if mode not in BOS_MODES:
        raise UsageError(f"unknown --bos '{mode}': use {', '.join(BOS_MODES)}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "off":
        return None
    if mode == "on":
        if bos is None:
            raise UsageError("--bos on: this tokenizer has no BOS token")
        return bos
    if bos is None:
        return None
    first = tokenizer("a")["input_ids"]
    return bos if first and first[0] == bos else None


def with_bos(rows: torch.Tensor, bos: Bos) -> torch.Tensor:
    """[N, T] rows with a BOS column in front ([N, T + 1]); the rows themselves when `bos` puts none first."""
    if not bos.on:
        return rows
    return torch.cat([torch.full_like(rows[:, :1], bos.token), rows], dim=1)


@dataclass(frozen=True)
class Window:
    """ids[begin:end] (after a BOS token when `bos`); targets at global positions >= score_from are scored
    (earlier ones were already). With a BOS, the window's first token is scored too (predicted from BOS)."""

    begin: int
    end: int
    score_from: int
    bos: bool = False

    @property
    def n_scored(self) -> int:
        return self.end - max(self.score_from, self.begin + (0 if self.bos else 1))


def check_windows(max_length: int, stride: int | None = None) -> None:
    """Reject window settings that cannot work (callers check before any slow work)."""
    if max_length < 2:
        raise UsageError(f"max_length must be at least 2, got {max_length}")
    if stride is not None and not 1 <= stride <= max_length:
        raise UsageError(f"stride must be between 1 and max_length ({max_length}), got {stride}")


def windows(n_tokens: int, max_length: int, stride: int | None = None, bos: Bos = NO_BOS) -> list[Window]:
    """Sliding windows over a stream (HF's fixed-length perplexity recipe); each target scored at most once.

    With stride == max_length the first token of each window has no context in it and goes unscored
    (1 target in max_length), as in HF's recipe; with stride < max_length every target 1..n-1 is scored.
    When `bos` is on, a window holds a BOS and max_length - 1 tokens of text (stride defaults to max_length - 1),
    and every token 0..n-1 is scored, the first of each window from the BOS alone.
    """
    span = max_length - 1 if bos.on else max_length
    check_windows(max_length, span if stride is None else stride)
    stride = span if stride is None else min(stride, span)
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + span, n_tokens)
        if end - begin >= (1 if bos.on else 2) and end > prev_end:
            out.append(Window(begin=begin, end=end, score_from=prev_end, bos=bos.on))
        prev_end = max(prev_end, end)
        if end == n_tokens:
            break
    return out


def pack(ids: torch.Tensor, seq_len: int, bos: Bos = NO_BOS) -> torch.Tensor:
    """Cut a token stream into full rows of `seq_len` (no padding; the ragged tail is dropped); when `bos` is on,
    each row is the BOS and seq_len - 1 tokens of text."""
    if seq_len < (2 if bos.on else 1):
        raise UsageError(f"seq_len must be at least {2 if bos.on else 1}, got {seq_len}")
    span = seq_len - bos.on
    n = ids.numel() // span
    if n == 0:
        raise CorpusError(f"need at least {span} tokens to pack one sequence, have {ids.numel()}")
    return with_bos(ids[: n * span].view(n, span), bos)
