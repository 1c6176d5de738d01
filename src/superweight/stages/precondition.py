"""Scale-free coordinates for a row patch: train u, with d = P u built from what the down-projection reads.

The loss sees the patch d only through x · d (x: the down-projection's input). Rescaling neuron j
(`core/reparam.rescale_mlp`: x_j -> a_j x_j, W[:, j] -> W[:, j] / a_j) leaves the model's function alone, but
the d that does the same thing becomes d_j / a_j, so an optimiser with a fixed lr in weight units lands
somewhere else at every parametrization (docs/recipes.md: `quick` recovers 95% at a = 1, 9% at a = 0.01).
In u the problem is the same at every parametrization:

    P = r · D^(-1/2) · (C + λ I)^(-1/2)        ("whitened"; "diagonal" drops the (C + λ I) factor)

D = diag(E[x xᵀ]) holds each neuron's mean square, C = D^(-1/2) E[x xᵀ] D^(-1/2) the neurons' correlations
(unchanged by any per-neuron rescaling), λ = `RepairConfig.damping` (C's mean eigenvalue is 1, so λ is
relative and scale-free), and r the RMS of the intact row's output (the scale of what the row writes). Under
x -> A x (A diagonal, positive), D -> A² D and C stays, so P -> A⁻¹ P and x · P u is the same function of u:
every optimiser follows the same path in u, and the trained d is the old one divided by a_j. The damping
keeps rarely active neurons (tiny D_j) from being amplified into directions that fire on held-out text.
Statistics come from the training tokens with the ablation on (what the student reads at the start).

    precond = preconditioners(model, coords, rows, seqs, mask, cfg)    # one per patch row
    patch = PreconditionedPatch(model, rows, precond)                  # parameters: u; vector(i): P u
    patch.weights()                                                    # d = P u, in weight units
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from superweight.core.arch import down_projection
from superweight.core.coords import WeightCoord
from superweight.core.intervene import Ablation, RowPatch
from superweight.core.reparam import neuron_balance
from superweight.measure.inputs import down_inputs


@dataclass
class Preconditioner:
    """d = P u for one patch row: `matrix` [d_ff, d_ff] (whitened) or `diag` [d_ff] (diagonal); `inverse` maps
    a weight-unit d back to u (a warm start)."""

    matrix: torch.Tensor | None
    diag: torch.Tensor | None
    inverse: torch.Tensor  # [d_ff, d_ff] or [d_ff]

    def to_weights(self, u: torch.Tensor) -> torch.Tensor:
        return self.diag * u if self.matrix is None else self.matrix @ u

    def to_coordinates(self, d: torch.Tensor) -> torch.Tensor:
        return self.inverse * d if self.matrix is None else self.inverse @ d


def preconditioner(x: torch.Tensor, w_row: torch.Tensor, space: str, damping: float) -> Preconditioner:
    """P from the inputs x [tokens, d_ff] a row reads and its intact weights w_row [d_ff]."""
    x = x.double()
    r = (x @ w_row.double()).pow(2).mean().sqrt()
    ms = x.pow(2).mean(0)  # D
    alive = ms > 0
    inv_sd = torch.where(alive, ms.clamp_min(1e-300).rsqrt(), torch.zeros_like(ms))
    if space == "diagonal":
        diag = r * inv_sd
        inverse = torch.where(alive, 1 / diag.clamp_min(1e-300), torch.zeros_like(diag))
        return Preconditioner(None, diag.float(), inverse.float())
    z = x * inv_sd  # unit mean square per live neuron
    corr = z.t() @ z / x.shape[0]  # C (zero rows and columns for dead neurons)
    evals, vecs = torch.linalg.eigh(corr + damping * torch.eye(corr.shape[0], dtype=corr.dtype))
    m = vecs @ torch.diag(evals.rsqrt()) @ vecs.t()  # (C + λI)^(-1/2)
    m_inv = vecs @ torch.diag(evals.sqrt()) @ vecs.t()
    sd = torch.where(alive, ms.sqrt(), torch.zeros_like(ms))
    matrix = r * inv_sd[:, None] * m
    inverse = (m_inv * sd[None, :]) / r
    return Preconditioner(matrix.float(), None, inverse.float())


def preconditioners(model: nn.Module, coords: list[WeightCoord], rows: list[tuple[int, int]],
                    sequences: torch.Tensor, mask: torch.Tensor | None, space: str, damping: float,
                    max_tokens: int) -> list[Preconditioner]:
    """One Preconditioner per patch row, from the first `max_tokens` training tokens, read with the ablation on
    (balanced: from the weights alone)."""
    if space == "balanced":
        out = []
        for layer, _ in rows:
            diag = 1 / neuron_balance(model, layer)
            out.append(Preconditioner(None, diag, 1 / diag))
        return out
    n_seq = max(1, min(sequences.shape[0], -(-max_tokens // sequences.shape[1])))
    seqs = sequences[:n_seq]
    m = None if mask is None else mask[:n_seq]
    inputs: dict[int, torch.Tensor] = {}
    with Ablation(model, coords):
        for layer, _ in rows:
            if layer not in inputs:
                inputs[layer] = down_inputs(model, seqs, layer, mask=m)[0]
    return [preconditioner(inputs[layer], down_projection(model, layer).row(row).float().cpu(), space, damping)
            for layer, row in rows]


def identity(model: nn.Module, rows: list[tuple[int, int]]) -> list[Preconditioner]:
    """P = I for every row: training in weight units."""
    ones = [torch.ones(down_projection(model, layer).d_ff) for layer, _ in rows]
    return [Preconditioner(None, o, o) for o in ones]


class PreconditionedPatch(RowPatch):
    """A row patch trained in scale-free coordinates: the parameters (`vectors`) are u, the hook adds P u."""

    def __init__(self, model: nn.Module, rows, precond: list[Preconditioner],
                 init: list[torch.Tensor] | None = None):
        coords = None if init is None else [p.to_coordinates(d.float().cpu()) for p, d in zip(precond, init)]
        super().__init__(model, rows, coords)
        device = self.vectors[0].device
        self._p = [Preconditioner(*(None if t is None else t.to(device) for t in (p.matrix, p.diag, p.inverse)))
                   for p in precond]

    def vector(self, i: int) -> torch.Tensor:
        return self._p[i].to_weights(self.vectors[i])

    def weights(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.vector(i).detach().clone() for i in range(len(self.vectors))]
