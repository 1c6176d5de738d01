"""Quantization as interventions that restore the model bit for bit (core/intervene.py's contract).

    with QuantizedWeights(model, QuantSpec(4, 64), keep=coords, mode="hold") as q:
        logits = model(ids).logits        # every decoder linear ran with its 4-bit block-64 weight
    q.stats                               # per layer: weights, blocks, clipped, what the kept weights became
    # every weight is back, exactly

One model copy: each linear layer is quantized in place just before it runs, from an fp copy of that one
tensor, and written back from the copy as soon as it has run (a forward pre-hook and a forward hook). At most
one layer's copy exists at a time, so a sweep over block sizes never holds a second model; the price is one
quantization of each tensor per forward pass (about a tenth of the pass on SmolLM2-135M). `eager=True`
quantizes everything on `apply()` instead (fp copies of every tensor until `remove()`): for many small passes
(lm-eval tasks), at the memory cost of a second copy of the decoder's linear weights.

`QuantizedInputs` fake-quantizes what linear layers read (per-tensor symmetric INT-N of each forward's input),
optionally holding listed input channels (the super activation: the super weight's column at its layer's
down-projection) out of the range and in full precision. Hooks only: nothing to restore but the hooks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from superweight.core.arch import decoder_linears, down_projection, down_projections, linear_matrix
from superweight.core.coords import WeightCoord, as_coords
from superweight.core.intervene import Intervention, module_of
from superweight.core.quant import QuantSpec, TensorStats, fake_quantize


class _Hooks(Intervention):
    """Forward pre-hooks and forward hooks registered on apply, removed (and `_undo` run) on remove."""

    def _register(self) -> None:
        raise NotImplementedError

    def _undo(self) -> None:
        pass

    def apply(self) -> None:
        if self.active:
            raise RuntimeError("intervention is already applied")
        self.active = True
        self._handles = []
        try:
            self._register()
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while getattr(self, "_handles", None):
            self._handles.pop().remove()
        self._undo()
        self.active = False


def keep_map(model: nn.Module, coords: Iterable[WeightCoord]) -> dict[nn.Module, list[tuple[int, int]]]:
    """Kept down-projection weights grouped by module, as (row, col) of its [out, in] matrix; checked."""
    out: dict[nn.Module, list[tuple[int, int]]] = {}
    for c in coords:
        dp = down_projection(model, c.layer)
        dp.check(c.row, c.col)
        out.setdefault(dp.module, []).append((c.row, c.col))
    return out


class QuantizedWeights(_Hooks):
    """Every decoder linear weight fake-quantized with `spec`; `keep` weights handled by `mode` (core/quant.py)."""

    def __init__(self, model: nn.Module, spec: QuantSpec, keep: Iterable[WeightCoord] = (), mode: str = "none",
                 eager: bool = False, extra: dict[nn.Module, list[tuple[int, int]]] | None = None):
        """`extra`: more kept weights of any decoder linear, (row, col) of its [out, in] matrix, handled like `keep`
        but without per-weight diagnostics in `stats` (e.g. the clipped outliers that matter most)."""
        self.spec, self.mode, self.eager = spec, mode, eager
        model = module_of(model)
        self.targets = decoder_linears(model)
        self.keep = keep_map(model, as_coords(keep, unique=False))  # validated before anything is touched
        self._diagnose = {m: len(v) for m, v in self.keep.items()}
        for module, pairs in (extra or {}).items():
            self.keep[module] = self.keep.get(module, []) + [p for p in pairs if p not in self.keep.get(module, [])]
        self.n_extra = sum(len(v) for v in (extra or {}).values())
        self.stats: dict[str, TensorStats] = {}
        self._saved: dict[str, torch.Tensor] = {}

    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(linear_matrix(m).shape) for _, m in self.targets]

    def _quantize(self, name: str, module: nn.Module) -> None:
        if name in self._saved:  # already quantized (a module called twice in one pass)
            return
        matrix = linear_matrix(module)
        self._saved[name] = matrix.detach().clone()
        q, self.stats[name] = fake_quantize(self._saved[name], self.spec, self.keep.get(module, []), self.mode,
                                            diagnose=self._diagnose.get(module, 0))
        with torch.no_grad():
            matrix.copy_(q)

    def _restore(self, name: str, module: nn.Module) -> None:
        saved = self._saved.pop(name, None)
        if saved is not None:
            with torch.no_grad():
                linear_matrix(module).copy_(saved)

    def _register(self) -> None:
        if self.eager:
            for name, module in self.targets:
                self._quantize(name, module)
            return
        for name, module in self.targets:
            self._handles.append(module.register_forward_pre_hook(
                lambda m, _args, name=name: self._quantize(name, m)))
            self._handles.append(module.register_forward_hook(
                lambda m, _args, _out, name=name: self._restore(name, m)))

    def _undo(self) -> None:
        # Eager copies, and any lazy one left by a pass that raised between the two hooks.
        for name, module in self.targets:
            self._restore(name, module)

    def n_clipped(self) -> int:
        return sum(s.n_clipped for s in self.stats.values())


def symmetric_rtn(x: torch.Tensor, bits: int, hold: list[int] = ()) -> torch.Tensor:
    """Per-tensor symmetric absmax round-to-nearest of `x`; the `hold` last-dimension channels keep their values
    and are left out of the absmax."""
    xf = x.float()
    top = 2 ** (bits - 1) - 1
    if hold:
        others = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
        others[list(hold)] = False
        absmax = xf[..., others].abs().max() if others.any() else xf.new_tensor(0.0)
    else:
        absmax = xf.abs().max()
    scale = absmax.clamp(min=torch.finfo(torch.float32).tiny) / top
    q = (xf / scale).round_().clamp_(-top, top).mul_(scale)
    if hold:
        q[..., list(hold)] = xf[..., list(hold)]
    return q.to(x.dtype)


class QuantizedInputs(_Hooks):
    """The inputs of the down-projections (or, with `which="all"`, of every decoder linear) quantized per tensor to
    `bits`; `hold` (super weights) keeps each one's column of its own layer's down-projection input in fp."""

    def __init__(self, model: nn.Module, bits: int = 8, which: str = "down", hold: Iterable[WeightCoord] = ()):
        if which not in ("down", "all"):
            raise ValueError(f"which must be 'down' or 'all', got {which!r}")
        self.bits = bits
        model = module_of(model)
        hold = as_coords(hold, unique=False)
        self.targets = ([dp.module for dp in down_projections(model)] if which == "down"
                        else [m for _, m in decoder_linears(model)])
        self.hold: dict[nn.Module, list[int]] = {}
        for module, pairs in keep_map(model, hold).items():
            self.hold[module] = sorted({col for _row, col in pairs})

    def _register(self) -> None:
        for module in self.targets:
            cols = self.hold.get(module, [])

            def hook(_m, args, cols=cols):
                return (symmetric_rtn(args[0], self.bits, cols), *args[1:])

            self._handles.append(module.register_forward_pre_hook(hook))
