"""The parametrised patch: a row patch trained in a *space*, u, with d = unit * u for a per-neuron unit.

One name for one idea: the *space* is the coordinates the optimiser works in (the config's `space`), and its
*units* (`space_units`) are what one step of u is worth in weight units, per neuron. Two spaces are scale-free.
The column one, unit_j = ‖W[:, j]‖ (the down-projection's column norms), follows all three function-preserving
symmetries of a pre-norm transformer (core/reparam.py): rescaling neuron j by a_j (W[:, j] / a_j, so unit_j / a_j,
as the equivalent patch d_j / a_j), scaling the residual stream by c (W * c, so unit * c, as d * c) and moving a
norm's gain into the projections that read it (W and x unchanged). The loss is then the same function of u at
every parametrization, and so is an optimiser's path. The balanced one below follows only the first.

The loss sees the patch d only through x · d (x: the down-projection's input). Rescaling neuron j
(`core/reparam.rescale_mlp`: x_j -> a_j x_j, W[:, j] -> W[:, j] / a_j) leaves the model's function alone, but
the d that does the same thing becomes d_j / a_j, so an optimiser working on d with a fixed lr lands somewhere
else at every parametrization (docs/recipes.md: `quick` recovers 95% at a = 1, 9% at a = 0.01). Training u with
d_j = u_j / n_j, n_j = sqrt(‖up_j‖ / ‖W[:, j]‖) (`core/reparam.neuron_balance`), removes that: n_j -> a_j n_j
under the rescaling, so x · d is the same function of u at every parametrization and any optimiser follows
the same path in u. u is d in the balanced parametrization (‖up_j‖ = ‖W[:, j]‖ for every neuron), which is
where weight decay leaves a trained model: SmolLM2-135M's n_j lie in 0.88-1.72, so on it the balanced space
is close to the weight space that the `sgd` recipe was tuned in.

GELU MLPs (gpt2, gpt_neox) have no function-preserving neuron scale: there, "balanced" is the weight space.

    patch = SpacePatch(model, rows, space_units(model, rows, "balanced"))   # parameters: u
    patch.weights()                                                        # d = u / n, weight units
    patch.exclude([[1229]])        # d[1229] of the first row is held at exactly 0 (a mask: scale-free too)

An exclusion is a mask on the space, entry by entry: an excluded entry of d is exactly 0 whatever u holds,
and its gradient is 0, so it keeps every symmetry the column (or balanced) space follows.
"""

from __future__ import annotations

import torch
from torch import nn

from superweight.core.arch import down_projection
from superweight.core.coords import split_row
from superweight.core.intervene import RowPatch
from superweight.core.reparam import neuron_balance
from superweight.errors import UnsupportedArchitectureError, UsageError


def space_units(model: nn.Module, rows: list[tuple[int, ...]], space: str) -> list[torch.Tensor]:
    """Per patch row, the units [d_ff] of `space` (d = unit * u): ones in the weight space, 1 / n in the balanced one, the
    down-projection's column norms ‖W[:, j]‖ in the column one (a zero column keeps 1: nothing to scale by).
    An expert's row uses its own expert's matrix; the balanced space is not defined for experts."""
    out = []
    for layer, _, expert in map(split_row, rows):
        dp = down_projection(model, layer, expert)
        if expert is not None and space == "balanced":
            raise UsageError("the balanced space (recipe balanced) is not defined for an expert's row: use the "
                             "column space (recipe lbfgs, the default) or the weight space")
        unit = torch.ones(dp.d_ff)
        if space == "column":
            norms = dp.matrix.float().norm(dim=0).cpu()
            unit = torch.where(norms > 0, norms, torch.ones_like(norms))
        elif space == "balanced":
            try:
                unit = 1 / neuron_balance(model, layer)
            except UnsupportedArchitectureError:  # GELU: the weight space is the only one
                pass
        out.append(unit)
    return out


class SpacePatch(RowPatch):
    """A row patch trained in a space: the parameters (`vectors`) are u, the hook adds d = unit * u. `units`:
    space_units(...) (None: the weight space); `init` is in weight units."""

    def __init__(self, model: nn.Module, rows, units: list[torch.Tensor] | None = None,
                 init: list[torch.Tensor] | None = None):
        units = units if units is not None else space_units(model, rows, "weight")
        u = None if init is None else [d.float().cpu() / unit for unit, d in zip(units, init)]
        super().__init__(model, rows, u)
        self._units = [unit.to(self.vectors[0].device) for unit in units]
        self._keep: list[torch.Tensor | None] = [None] * len(self.vectors)

    def exclude(self, columns: list[list[int]] | None) -> None:
        """Hold the entries `columns[i]` of row i's d at exactly 0 (None or [] for a row: none); u is zeroed there."""
        for i, cols in enumerate(columns or []):
            if not cols:
                continue
            keep = torch.ones(self.vectors[i].numel(), dtype=torch.bool, device=self.vectors[i].device)
            keep[torch.tensor(sorted(cols), dtype=torch.long)] = False
            self._keep[i] = keep
            with torch.no_grad():
                self.vectors[i].masked_fill_(~keep, 0.0)

    def vector(self, i: int) -> torch.Tensor:
        d = self._units[i] * self.vectors[i]
        return d if self._keep[i] is None else d.masked_fill(~self._keep[i], 0.0)

    def weights(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.vector(i).detach().clone() for i in range(len(self.vectors))]
