"""Data-parallel repair: `accelerate launch` with two CPU processes (gloo) trains the same patch as one process
with the same global batch, and only process 0 writes the run directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli

from superweight.errors import UsageError
from superweight.io.patchfile import load_patch
from superweight.stages.distributed import DataParallel

REPAIR = ["repair", "--recipe", "balanced", "--weight", "1:5:7", "--steps", "3", "--batch-size", "4", "--seq-len", "32",
          "--eval-tokens", "128", "--dtype", "fp32"]


def test_one_process_is_the_identity():
    dp = DataParallel()
    loss, mask = torch.tensor(0.7), torch.ones(2, 5)
    assert dp.shard([3, 1, 4]) == [3, 1, 4] and dp.share_of_mean(loss, mask) is loss and dp.is_main


def test_shards_cover_the_batch_once():
    batch = [5, 2, 7, 1, 0]
    shards = [DataParallel(rank, 2).shard(batch) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(batch) and shards == [[5, 7, 0], [2, 1]]
    with pytest.raises(UsageError, match="at least the number of processes"):
        DataParallel(2, 3).shard([1, 2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
                    reason="accelerate's launcher is not installed")
def test_two_processes_train_the_patch_of_one(planted_dir, tmp_path):
    invoke_cli(*REPAIR, "--model", planted_dir, "--out", tmp_path / "one")
    launcher = Path(sys.executable).parent / "accelerate"
    # --multi_gpu selects torchrun's multi-process launcher; without GPUs the processes talk over gloo.
    # (`--cpu --num_processes 2` would start a single process unless MPI is configured.)
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "superweight.cli", *REPAIR, "--model", str(planted_dir), "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data-parallel: 2 processes share each batch of 4 sequences" in proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count("Run directory:") == 1  # process 1 prints nothing
    one, two = load_patch(tmp_path / "one"), load_patch(tmp_path / "two")
    assert one.vectors[0].norm() > 0
    assert torch.allclose(one.vectors[0], two.vectors[0], rtol=1e-4, atol=1e-6)
    logs = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert logs[0] == pytest.approx(logs[1], rel=1e-5)  # the logged loss is the global mean, not a share
    assert not list(Path(tmp_path).glob("superweight-rank*"))
