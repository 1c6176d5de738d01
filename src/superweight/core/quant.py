"""Fake quantization as pure tensor functions: round-to-nearest (RTN) per block, per channel or per tensor, INT or
NF levels, outlier clipping, and weights kept in full precision.

    spec = QuantSpec(bits=4, block=64, clip=Clip("tensor", 1e-4))
    q, stats = fake_quantize(W, spec, keep=[(507, 1229)], mode="restore")   # W is [out, in]; W is not modified

Conventions (those of the super-weight paper's code, `outliers/functional/quantization.py`):
- a block of size B is B consecutive weights of the row-major [out, in] matrix (an nn.Linear's storage order),
  so a block spans rows when B does not divide `in`; a trailing partial block is quantized on its own range;
- "channel" is one range per output row, "tensor" one range for the whole matrix;
- INT levels are asymmetric min-max: 2^bits evenly spaced values from the block's min to its max (both exact);
- NF levels map [min, max] onto [-1, 1] and round to the nearest NormalFloat level: NF4 is QLoRA's table
  (Dettmers et al. 2023, as in bitsandbytes), NF3 the 8 levels of the paper's code. bitsandbytes itself is
  not used (it needs a GPU); these are the same levels, computed by hand;
- clipping clamps |w| to a threshold before the range is taken: `tensor:P` clips the fraction P of largest |w|
  in the matrix, `block:P` that fraction in each block, `zscore:Z` above mean + Z std of |w| per block, `iqr:K`
  above q3 + K (q3 - q1) of |w| per block.

Kept weights (the super weights) are handled by `mode`:
- "hold": they are left out of their block's min/max (and out of clipping) and keep their fp value, so the other
  weights of the block get a range without them;
- "restore": the block is clipped and quantized with them in it, then they are written back in fp (the paper's
  "restore the super weight");
- "none": they are quantized like every other weight.
With min-max levels a kept weight that is its block's max or min is represented exactly even with "none":
holding it out then changes only its block-mates' step. `KeptStat` records which of the two changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from superweight.errors import UsageError

# QLoRA's NormalFloat-4 levels (bitsandbytes' table) and the paper code's NF3 levels, on [-1, 1].
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
NF3 = (-1.0, -0.5350227355957031, -0.2469314038753510, 0.0, 0.1833375245332718, 0.3819939494132996,
       0.6229856610298157, 1.0)
NF_LEVELS = {4: NF4, 3: NF3}
SCALE_BITS = 16  # each block stores a 16-bit scale and a 16-bit zero point (min)
KEPT_BITS = 16 + 32  # a kept outlier: its 16-bit value and a 32-bit index
CLIP_METHODS = ("tensor", "block", "zscore", "iqr")
MODES = ("none", "hold", "restore")


@dataclass(frozen=True)
class Clip:
    method: str  # tensor | block | zscore | iqr
    value: float

    def __str__(self) -> str:
        return f"{self.method}:{self.value:g}"


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    block: int | str  # an integer size, "channel" or "tensor"
    levels: str = "int"  # int | nf
    clip: Clip | None = None

    def __str__(self) -> str:
        clip = f", clip {self.clip}" if self.clip else ""
        return f"{self.bits}-bit {self.levels.upper()} RTN, block {self.block}{clip}"


@dataclass
class KeptStat:
    """What quantization did to one kept weight and to the other weights of its block."""

    row: int
    col: int
    value: float  # the fp value
    quantized: float  # its value after this condition
    step: float  # its block's quantization step (range / (levels - 1))
    block_rmse: float  # RMS error of the other weights in its block
    block_size: int


@dataclass
class TensorStats:
    n_weights: int
    n_groups: int
    n_clipped: int = 0
    kept: list[KeptStat] = field(default_factory=list)


# ----------------------------------------------------------------------------- option parsing (no model needed)
def parse_bits(text: str) -> list[int]:
    try:
        bits = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"invalid --bits '{text}': expected comma-separated integers from 2 to 8") from None
    if not bits or any(not 2 <= b <= 8 for b in bits):
        raise UsageError(f"invalid --bits '{text}': each must be an integer from 2 to 8")
    return bits


def parse_blocks(text: str) -> list[int | str]:
    blocks: list[int | str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in ("channel", "tensor"):
            blocks.append(part)
        elif part.isdigit() and int(part) >= 2:
            blocks.append(int(part))
        else:
            raise UsageError(f"invalid --block '{part}': use integer sizes of at least 2, channel or tensor")
    if not blocks:
        raise UsageError("--block is empty")
    return blocks


def parse_clip(text: str) -> Clip | None:
    if text.strip() == "none":
        return None
    method, _, value = text.partition(":")
    if method not in CLIP_METHODS:
        raise UsageError(f"unknown --clip method '{method}': use none, tensor:P, block:P, zscore:Z or iqr:K")
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"invalid --clip '{text}': {method} needs a number, e.g. {method}:"
                         f"{'1e-4' if method in ('tensor', 'block') else '3'}") from None
    if method in ("tensor", "block") and not 0 < number < 1:
        raise UsageError(f"invalid --clip '{text}': the fraction clipped must lie between 0 and 1")
    if not number >= 0 or not math.isfinite(number):
        raise UsageError(f"invalid --clip '{text}': {method} needs a finite number >= 0")
    return Clip(method, number)


def check_levels(levels: str, bits: list[int]) -> None:
    if levels not in ("int", "nf"):
        raise UsageError(f"unknown --levels '{levels}': use int or nf")
    if levels == "nf" and any(b not in NF_LEVELS for b in bits):
        raise UsageError("--levels nf has tables for 3 and 4 bits only (NF3, NF4)")


def check_blocks(blocks: list[int | str], shapes: list[tuple[int, int]]) -> None:
    """A block size that divides no matrix is almost certainly a typo (every matrix would get a partial block)."""
    for b in blocks:
        if isinstance(b, int) and not any((o * i) % b == 0 for o, i in shapes):
            sizes = ", ".join(f"{o}x{i}" for o, i in sorted(set(shapes)))
            raise UsageError(f"invalid --block {b}: it divides none of the quantized matrices ({sizes})")


# ----------------------------------------------------------------------------- the quantizer
def n_groups(shape: tuple[int, int], block: int | str) -> int:
    out, inn = shape
    if block == "tensor":
        return 1
    if block == "channel":
        return out
    return -(-(out * inn) // int(block))


def effective_bits(bits: int, shapes: list[tuple[int, int]], block: int | str, n_kept: int = 0) -> float:
    """Bits per weight: the codes, a 16-bit scale and zero per block, and 16+32 bits per outlier kept in fp."""
    weights = sum(o * i for o, i in shapes)
    groups = sum(n_groups(s, block) for s in shapes)
    return (bits * weights + 2 * SCALE_BITS * groups + KEPT_BITS * n_kept) / weights


def grouped(matrix: torch.Tensor, block: int | str) -> tuple[torch.Tensor, int]:
    """An fp32 copy of `matrix` as [groups, size] (padded with its last value), and the number of real weights."""
    out, inn = matrix.shape
    flat = torch.empty((out, inn), dtype=torch.float32, device=matrix.device)
    flat.copy_(matrix)
    flat = flat.view(-1)
    n = flat.numel()
    if block == "tensor":
        return flat.view(1, n), n
    if block == "channel":
        return flat.view(out, inn), n
    pad = (-n) % int(block)
    if pad:  # repeating the last weight keeps the partial block's min and max
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, int(block)), n


def _position(flat_index: int, block: int | str, inn: int) -> tuple[int, int]:
    if block == "tensor":
        return 0, flat_index
    if block == "channel":
        return divmod(flat_index, inn)
    return divmod(flat_index, int(block))


def _kth_abs(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of each row of a."""
    return a.kthvalue(max(1, min(k, a.shape[1])), dim=1, keepdim=True).values


def clip_threshold(a: torch.Tensor, clip: Clip, n: int) -> torch.Tensor | None:
    """Per-group (or scalar) threshold on |w| for the grouped |weights| `a` [G, size]; None: clip nothing."""
    size = a.shape[1]
    if clip.method == "tensor":
        k = int(clip.value * n)  # weights clipped
        return torch.topk(a.reshape(-1), k + 1).values[-1] if k else None
    if clip.method == "block":
        k = int(clip.value * size)
        return torch.topk(a, k + 1, dim=1).values[:, -1:] if k else None
    if clip.method == "zscore":
        return a.mean(1, keepdim=True) + clip.value * a.std(1, keepdim=True)
    q1, q3 = _kth_abs(a, round(0.25 * size)), _kth_abs(a, round(0.75 * size))
    return q3 + clip.value * (q3 - q1)


def fake_quantize(matrix: torch.Tensor, spec: QuantSpec, keep: list[tuple[int, int]] = (),
                  mode: str = "none", diagnose: int | None = None) -> tuple[torch.Tensor, TensorStats]:
    """The dequantized [out, in] matrix in fp32 (a new tensor; `matrix` is only read) and what happened.
    `diagnose`: how many of the first kept weights get a `KeptStat` (default all)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out, inn = matrix.shape
    g, n = grouped(matrix, spec.block)
    where = [_position(r * inn + c, spec.block, inn) for r, c in keep]
    held = mode == "hold" and bool(where)
    gi = torch.tensor([p[0] for p in where], dtype=torch.long, device=g.device)
    gj = torch.tensor([p[1] for p in where], dtype=torch.long, device=g.device)
    original = g[gi, gj].clone()
    stats = TensorStats(n_weights=n, n_groups=g.shape[0])
    if spec.clip is not None:
        a = g.abs()
        if held:
            a[gi, gj] = 0.0  # held out of the clipping statistics too
        thr = clip_threshold(a, spec.clip, n)
        if thr is not None:
            over = a > thr
            stats.n_clipped = int(over.view(-1)[:n].sum())
            del a, over
            g.clamp_(min=-thr, max=thr)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    if held:  # each block holding a kept weight gets the range of its other weights
        for row in gi.unique().tolist():
            others = torch.ones(g.shape[1], dtype=torch.bool, device=g.device)
            others[gj[gi == row]] = False
            if others[: n - row * g.shape[1]].any():
                rest = g[row][others]
                lo[row], hi[row] = rest.min(), rest.max()
    span = hi - lo
    span[span == 0] = 1.0  # a constant block: every weight maps to level 0, i.e. exactly to lo
    stats_before = [(int(i), int(j), float(lo[i]), float(span[i])) for i, j in zip(gi.tolist(), gj.tolist())]
    if spec.levels == "nf":
        levels = torch.tensor(NF_LEVELS[spec.bits], dtype=torch.float32, device=g.device)
        t = g.sub_(lo).div_(span).mul_(2.0).sub_(1.0)
        idx = torch.bucketize(t, (levels[1:] + levels[:-1]) / 2)
        g = levels[idx].add_(1.0).mul_(span / 2).add_(lo)
        steps = [sp * (NF_LEVELS[spec.bits][-1] - NF_LEVELS[spec.bits][-2]) / 2 for _, _, _, sp in stats_before]
    else:
        top = 2 ** spec.bits - 1
        scale = span / top
        g.sub_(lo).div_(scale).round_().clamp_(0, top).mul_(scale).add_(lo)
        steps = [sp / top for _, _, _, sp in stats_before]
    if mode in ("hold", "restore") and where:
        g[gi, gj] = original
    flat = g.view(-1)[:n]
    if where and diagnose != 0:
        x = grouped(matrix, spec.block)[0]
        todo = list(zip(keep, stats_before, original.tolist(), steps))[:diagnose]
        for (r, c), (i, j, _lo, _sp), w0, step in todo:
            others = torch.ones(g.shape[1], dtype=torch.bool, device=g.device)
            others[gj[gi == i]] = False
            real = min(g.shape[1], n - i * g.shape[1])
            others[real:] = False
            err = (g[i][others] - x[i][others]).pow(2).mean().sqrt().item() if others.any() else 0.0
            stats.kept.append(KeptStat(row=r, col=c, value=w0, quantized=float(g[i, j]), step=step,
                                       block_rmse=err, block_size=real))
    return flat.view(out, inn), stats
