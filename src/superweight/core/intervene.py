"""Interventions that always come off cleanly, and hooks that read activations.

Every intervention is an object with `apply()` and `remove()` that restores the model bit for bit, and a
context manager that removes itself even when the block raises (in the manner of baukit's `Trace`, but
resolving every module before touching any):

    with Ablation(model, [WeightCoord(layer=11, row=507, col=1229)]):
        broken_logits = model(ids).logits
    # the weight is back, exactly

Each takes the model as an nn.Module or as the loaded handle (io/models.Loaded: its `.model`), and weights as
WeightCoord objects or "L:R:C[@S]" texts (core/coords.as_coords), rows as tuples or "L:R" texts:
`Ablation(m, "11:507:1229")`, `RowPatch(m, ["11:507"], [d])`.

One model copy serves as both "base" and "intervened": switch the intervention off for the base pass.
In a mixture of experts, coordinates and rows name the expert (core/coords.py) and `ExpertPrune` removes whole
experts from the routing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from superweight.core import moe
from superweight.core.arch import DownProj, down_projection, moe_block
from superweight.core.coords import SHARED, WeightCoord, as_coords, make_row, parse_row, split_row
from superweight.errors import CoordinateError


def module_of(model) -> nn.Module:
    """The nn.Module to edit: `model` itself, or a loaded model handle's `.model` (io/models.Loaded, which core
    cannot import)."""
    if isinstance(model, nn.Module):
        return model
    try:
        inner = model.model
    except AttributeError:
        inner = None
    if not isinstance(inner, nn.Module):
        raise TypeError(f"expected a model (nn.Module) or a loaded model handle, got {type(model).__name__}")
    return inner


class Intervention:
    """Base class: `apply()` edits the model, `remove()` undoes it exactly; reusable after removal."""

    active: bool = False

    def apply(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def row_edits(self) -> list[tuple[DownProj, int, torch.Tensor]] | None:
        """This edit as changes to rows of dense down-projections: (projection, row, the change to W[row], fp32
        [d_ff]), read from the weights as they are now; None when it is not one (a hook on activations, a routed
        expert, ...). measure/generate.compare decodes conditions that all have one in a single batch."""
        return None

    def __enter__(self):
        self.apply()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class NoIntervention(Intervention):
    """The identity, so callers need not special-case "nothing to do"."""

    def apply(self) -> None:
        self.active = True

    def remove(self) -> None:
        self.active = False

    def row_edits(self) -> list:
        return []


# An edit maps a weight's original value to its new value.
Edit = Callable[[torch.Tensor], torch.Tensor]


class ScalarEdits(Intervention):
    """Overwrite individual down-projection scalars; `remove()` writes the saved originals back."""

    def __init__(self, model: nn.Module, edits: Iterable[tuple[DownProj, int, int, Edit]]):
        # Every coordinate is validated before anything is written.
        self._edits: list[tuple[DownProj, int, int, Edit]] = []
        for dp, row, col, fn in edits:
            dp.check(row, col)
            self._edits.append((dp, row, col, fn))
        self._saved: list[tuple[DownProj, int, int, torch.Tensor]] = []

    def apply(self) -> None:
        if self.active:
            raise RuntimeError("intervention is already applied")
        self.active = True
        try:
            for dp, row, col, fn in self._edits:
                original = dp.get(row, col)
                self._saved.append((dp, row, col, original))
                dp.set(row, col, fn(original))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        # Reverse order, so overlapping edits unwind to the true original.
        while self._saved:
            dp, row, col, original = self._saved.pop()
            dp.set(row, col, original)
        self.active = False


class Ablation(ScalarEdits):
    """Multiply each listed weight by its `scale` (0 zeroes it, the classic super-weight ablation)."""

    def __init__(self, model: nn.Module, coords: Iterable[WeightCoord] | WeightCoord | str):
        self.coords = as_coords(coords, unique=False)
        model = module_of(model)
        super().__init__(model, [(down_projection(model, c.layer, c.expert), c.row, c.col, _times(c.scale))
                                 for c in self.coords])

    def row_edits(self) -> list[tuple[DownProj, int, torch.Tensor]] | None:
        if any(dp.expert is not None for dp, *_ in self._edits):
            return None
        out = []
        for dp, row, col, fn in self._edits:
            w = dp.get(row, col)
            change = torch.zeros(dp.d_ff, dtype=torch.float32, device=dp.device)
            change[col] = (fn(w) - w).float()
            out.append((dp, row, change))
        return out


class Spread(ScalarEdits):
    """Zero W[row, col] and add W[row, col] / n to each of the next n columns (the seed's "spread").

    It keeps the row's sum but not the single huge scalar: a test of whether concentration matters.
    The value spread is the one the weight has when applied (so it composes after other edits).
    """

    def __init__(self, model: nn.Module, coord: WeightCoord | str, n: int = 8):
        model, (coord,) = module_of(model), as_coords(coord, unique=False)
        dp = down_projection(model, coord.layer, coord.expert)
        dp.check(coord.row, coord.col)
        if not 1 <= n < dp.d_ff:
            raise CoordinateError(f"spread needs 1 <= n < d_ff ({dp.d_ff}), got {n}")
        self._share: torch.Tensor | None = None

        def take(w: torch.Tensor) -> torch.Tensor:
            self._share = w / n
            return w * 0.0

        cols = [c % dp.d_ff for c in range(coord.col + 1, coord.col + 1 + n)]
        edits = [(dp, coord.row, coord.col, take)]
        edits += [(dp, coord.row, c, lambda w: w + self._share) for c in cols]
        super().__init__(model, edits)


def _times(scale: float) -> Edit:
    return lambda w: w * scale


def intact_values(model: nn.Module, coords: Iterable[WeightCoord]) -> list[float]:
    """The current values of the listed weights (call it with no intervention applied)."""
    model = module_of(model)
    return [down_projection(model, c.layer, c.expert).get(c.row, c.col).item() for c in as_coords(coords, unique=False)]


class Compose(Intervention):
    """Several interventions applied in order and removed in reverse."""

    def __init__(self, *parts: Intervention):
        self.parts = parts
        self._applied: list[Intervention] = []

    def apply(self) -> None:
        if self.active:
            raise RuntimeError("intervention is already applied")
        self.active = True
        try:
            for part in self.parts:
                part.apply()
                self._applied.append(part)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self._applied:
            self._applied.pop().remove()
        self.active = False

    def row_edits(self) -> list | None:
        parts = [p.row_edits() for p in self.parts]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]


class Trace:
    """Forward hooks that call `fn(name, inputs, output)` on named modules; removed on exit.

    with Trace({"l11": dp.module}, lambda name, inp, out: seen.append(out[..., 507])):
        model(ids)
    """

    def __init__(self, modules: dict[str, nn.Module], fn: Callable[[str, tuple, object], None]):
        self.modules = dict(modules)  # resolved by the caller before any hook is registered
        self.fn = fn
        self._handles: list = []

    def __enter__(self):
        try:
            for name, module in self.modules.items():
                hook = lambda _m, inp, out, name=name: self.fn(name, inp, out)  # noqa: E731
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc) -> None:
        self.close()


def hidden(output) -> torch.Tensor:
    """The hidden-state tensor of a block's output (a tensor, or a tuple whose first item is one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class HookIntervention(Intervention):
    """An intervention made of forward hooks: subclasses list (module, hook) pairs in `_hooks()`."""

    _handles: list

    def _hooks(self) -> list[tuple[nn.Module, Callable]]:
        raise NotImplementedError

    def apply(self) -> None:
        if self.active:
            raise RuntimeError("intervention is already applied")
        self.active = True
        self._handles = []
        try:
            for module, hook in self._hooks():
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while getattr(self, "_handles", None):
            self._handles.pop().remove()
        self.active = False


class RowPatch(HookIntervention):
    """Add a trainable vector `d` (length d_ff) to row `row` of a down-projection: out[..., row] += x @ d.

    Rank one, via a forward hook, so the weight itself is never written and only `d` gets gradients:

        patch = RowPatch(model, [(11, 507)])           # (3, 507, 17): row 507 of layer 3's expert 17
        with Ablation(model, coords), patch:
            loss = kl(teacher, model(ids).logits); loss.backward()   # patch.vectors[0].grad

    On a routed expert, x is its routed input (core/moe.py): the patch writes where the router sends a token to
    the expert, scaled by the routing weight, exactly as adding d to the expert's weight row would.
    """

    def __init__(self, model: nn.Module, rows: list[tuple | str], vectors: list[torch.Tensor] | None = None):
        model = module_of(model)
        rows = [rows] if isinstance(rows, str) else rows
        # (layer, row) or (layer, row, expert); "L:R" / "L:E:R" texts too
        self.rows = [parse_row(r) if isinstance(r, str) else make_row(*split_row(r)) for r in rows]
        if len(set(self.rows)) != len(self.rows):
            raise CoordinateError("a patch row is given more than once")
        self._dps = []
        for layer, row, expert in map(split_row, self.rows):
            dp = down_projection(model, layer, expert)
            dp.check(row)
            self._dps.append(dp)
        if vectors is None:
            vectors = [torch.zeros(dp.d_ff) for dp in self._dps]
        if len(vectors) != len(self.rows):
            raise CoordinateError(f"{len(self.rows)} patch rows but {len(vectors)} vectors")
        self.vectors = []
        for dp, v in zip(self._dps, vectors):
            if tuple(v.shape) != (dp.d_ff,):
                raise CoordinateError(f"patch vector for {dp.where} has shape {tuple(v.shape)}, need ({dp.d_ff},)")
            # On its own layer's device, so a model spread over devices (device_map) computes it in place.
            self.vectors.append(nn.Parameter(v.detach().to(device=dp.device, dtype=torch.float32).clone()))

    def parameters(self) -> list[nn.Parameter]:
        return list(self.vectors)

    def row_edits(self) -> list[tuple[DownProj, int, torch.Tensor]] | None:
        if type(self) is not RowPatch or any(dp.expert is not None for dp in self._dps):
            return None  # a subclass may gate its vectors per pass; a routed expert sees only its tokens
        return [(dp, r[1], v.detach().float()) for dp, r, v in zip(self._dps, self.rows, self.vectors)]

    def vector(self, i: int) -> torch.Tensor:
        """The vector added to row i at this forward pass (subclasses may gate it)."""
        return self.vectors[i]

    def _hooks(self):
        by_site: dict[tuple, list[int]] = {}  # one hook per down-projection, adding all of its patched rows
        for i, dp in enumerate(self._dps):
            by_site.setdefault((dp.layer, dp.expert), []).append(i)
        return [(self._dps[idx[0]].module, self._hook(idx)) for idx in by_site.values()]

    def _hook(self, idx: list[int]):
        rows = torch.tensor([self.rows[i][1] for i in idx], device=self.vectors[idx[0]].device)
        dp = self._dps[idx[0]]

        def hook(_module, inp, out):
            # fp32 whatever the model runs in (autocast included): the patch is small and precision matters.
            with torch.autocast(out.device.type, enabled=False):
                d = torch.stack([self.vector(i) for i in idx])  # [k, d_ff]
                delta = dp.inputs(inp).to(d.device).float() @ d.t()  # [..., k]
                return out.index_add(-1, rows.to(out.device), delta.to(out.device, out.dtype))

        return hook


class ActivationRestore(HookIntervention):
    """The paper's baseline: with super weights ablated, put back only the super activation.

    At each forward, the intact value of channel `row` is out + x[col] * (w_original - w_ablated); it is
    restored at the token positions where the weight's own contribution |x[col] * w_original| is at least
    `fraction` of its largest value in the batch (the massive-activation tokens), and nowhere else.
    Apply it on top of the Ablation; `originals` are the weights' intact values.
    """

    def __init__(self, model: nn.Module, coords: list[WeightCoord], originals: list[float], fraction: float = 0.1):
        model, coords = module_of(model), as_coords(coords, unique=False)
        self.items = []
        for c, w in zip(coords, originals):
            dp = down_projection(model, c.layer, c.expert)
            dp.check(c.row, c.col)
            self.items.append((dp, c.row, c.col, float(w), float(w) * c.scale))
        self.fraction = fraction

    def _hooks(self):
        return [(dp.module, self._hook(dp, row, col, w, w_abl)) for dp, row, col, w, w_abl in self.items]

    def _hook(self, dp: DownProj, row: int, col: int, w: float, w_abl: float):
        def hook(_module, inp, out):
            x = dp.inputs(inp)[..., col].float()
            own = (x * w).abs()
            where = own >= self.fraction * own.max()
            fix = torch.where(where, x * (w - w_abl), torch.zeros_like(x))
            out = out.clone()
            out[..., row] += fix.to(out.dtype)
            return out

        return hook


class ExpertPrune(HookIntervention):
    """Prune whole experts, the "super expert" experiment: the router never picks a pruned routed expert (its
    logit is set to -inf and the top-k taken from the others, renormalised as the router does), and a pruned
    shared expert adds nothing. `experts`: (layer, expert) pairs, expert an index or "shared".

        with ExpertPrune(model, [(3, 17)]):
            pruned_logits = model(ids).logits
    """

    def __init__(self, model: nn.Module, experts: Iterable[tuple[int, int | str]]):
        model = module_of(model)
        self.experts = [(int(layer), e) for layer, e in experts]
        if len(set(self.experts)) != len(self.experts):
            raise CoordinateError("an expert to prune is given more than once")
        self._drop: dict[int, list[int]] = {}
        self._routers: dict[int, nn.Module] = {}
        self._shared: list[nn.Module] = []
        for layer, e in self.experts:
            dp = down_projection(model, layer, e)  # validates the layer and the expert
            if dp.expert is None:
                raise CoordinateError(f"layer {layer} has no experts to prune")
            _experts, router, shared = moe_block(model, layer)
            if e == SHARED:
                self._shared.append(shared)
            else:
                self._drop.setdefault(layer, []).append(int(e))
                self._routers[layer] = router
        for router in self._routers.values():
            moe.check_router(router)

    def _hooks(self):
        hooks = [(self._routers[layer], self._mask(drop)) for layer, drop in self._drop.items()]
        return hooks + [(m, lambda _m, _inp, out: torch.zeros_like(out)) for m in self._shared]

    @staticmethod
    def _mask(drop: list[int]):
        def hook(router, _inp, out):
            moe.check_routing(router, out)  # the router's own output, reproduced, before it is changed
            return moe.masked_routing(router, out[0], drop, out)

        return hook
