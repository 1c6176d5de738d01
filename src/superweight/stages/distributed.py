"""Data-parallel repair: several processes (GPUs, nodes) share each global batch, and agree on one patch.

    accelerate launch --multi_gpu --num_processes 4 -m superweight.cli repair --weight 1:1764:1710 ...

Every process holds the whole model and the same patch. Per step each takes its share of the global batch's
sequences (`shard`), computes the sum of its per-token losses divided by the *global* token count
(`share_of_mean`), and the patch gradients are summed over processes (`all_reduce_grads`): the update is
the one a single process makes with the same global batch (up to float summation order; a test checks), so
the optimiser states stay identical without any broadcast. Only process 0 writes the run directory; the
others work in a scratch copy (`run_dir_for`). With one process every call is the identity.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from superweight.errors import UsageError


class DataParallel:
    """This process's place among `world` processes (rank 0 is the one that writes)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world, self.device = rank, world, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This process's sequences of a global batch (strided, so every process gets a share when it can)."""
        if self.world == 1:
            return indices
        mine = indices[self.rank :: self.world]
        if not mine:
            raise UsageError(f"a batch of {len(indices)} sequences cannot be shared by {self.world} processes: "
                             "use --batch-size of at least the number of processes")
        return mine

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over processes (a copy; every process gets the same result)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        total = value.detach().clone().to(self._comm_device(value))
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(value.device)

    def share_of_mean(self, mean_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Turn this process's mean over its `mask.sum()` tokens into its share of the global mean."""
        if self.world == 1:
            return mean_loss
        local = mask.bool().sum().to(torch.float64)
        return mean_loss * (local / self.sum(local)).to(mean_loss.dtype)

    def all_reduce_grads(self, params) -> None:
        """Sum every parameter's gradient over processes, in place (after backward, before the step)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                p.grad.copy_(self.sum(p.grad))

    def barrier(self) -> None:
        """Wait until every process got here (e.g. all have checked the run directory before any writes)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self, value: torch.Tensor) -> torch.device:
        import torch.distributed as dist

        return value.device if dist.get_backend() == "nccl" else torch.device("cpu")

    @contextmanager
    def run_dir_for(self, out: Path, resume: bool = False):
        """The run directory this process writes: `out` on rank 0, a scratch copy elsewhere (deleted after)."""
        if self.is_main:
            yield Path(out)
            return
        scratch = Path(tempfile.mkdtemp(prefix=f"superweight-rank{self.rank}-"))
        try:
            target = scratch / Path(out).name
            if resume and Path(out).is_dir():  # the others resume from the same checkpoint as rank 0
                shutil.copytree(out, target)
            yield target
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


@lru_cache(maxsize=1)
def current() -> DataParallel:
    """This process's `DataParallel`, from the launcher's environment (`accelerate launch` / torchrun set
    WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR); one process when WORLD_SIZE is unset or 1.

    torch.distributed is initialised directly (nccl with GPUs, gloo on CPUs): accelerate's own state picks no
    backend for several processes on a machine without GPUs, and this needs nothing else from it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DataParallel()
    import torch.distributed as dist

    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device is not None else "gloo")
    return DataParallel(dist.get_rank(), dist.get_world_size(), device)


def process_device(device: str) -> str:
    """The device of this process: under a multi-process launch `cuda`/`auto` means this process's own GPU."""
    dp = current()
    if dp.world > 1 and device in {"cuda", "auto"} and dp.device is not None and dp.device.type == "cuda":
        return str(dp.device)
    return device
