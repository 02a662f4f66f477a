"""Two CPU processes (gloo) on the same global batch reach the single-process weights."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from sae_testdata import SyntheticSource
from safetensors.torch import load_file, save_file

import saes
from saes.trainer import TrainConfig, Trainer

D, M, ROWS = 16, 64, 128
CFG = dict(total_tokens=ROWS * 12, batch_tokens=ROWS, lr=3e-3, progress=False, log_every=4, dead_tokens=ROWS * 2)


def _train(arch: str) -> tuple[saes.SAE, Trainer]:
    torch.manual_seed(0)
    sae = saes.build(arch, d_model=D, d_sae=M, k=6)
    return sae, Trainer(sae, TrainConfig(**CFG)).fit(SyntheticSource(D, rows=ROWS))


def _worker(rank: int, world: int, port: int, arch: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        sae, tr = _train(arch)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, out)
            save_file({"fvu": torch.tensor([tr.history_[-1][""]["fvu"]])}, out + ".log")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("arch", ["topk"])
def test_two_processes_match_one(arch, tmp_path):
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(_worker, args=(2, _free_port(), arch, out), nprocs=2, join=True)
    ref, tr = _train(arch)
    got = load_file(out)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(got[name], p, atol=1e-5, rtol=1e-4, msg=name)
    # the logged metrics are global too
    assert load_file(out + ".log")["fvu"].item() == pytest.approx(tr.history_[-1][""]["fvu"], rel=1e-4)


def _worker_with_folder(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        torch.manual_seed(0)
        sae = saes.build("topk", d_model=D, d_sae=M, k=6)
        Trainer(sae, TrainConfig(**CFG, checkpoint_every=4), out_dir=out).fit(SyntheticSource(D, rows=ROWS))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ranks_of_one_job_share_the_output_folder(tmp_path):
    """Rank 0 holds the folder's lock and writes; the other ranks are not refused."""
    mp.spawn(_worker_with_folder, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ref, _ = _train("topk")
    back = saes.load(tmp_path / "sae")
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], p, atol=1e-5, rtol=1e-4, msg=name)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step_000000008",
                                                                           "step_000000012"]
    assert not list(tmp_path.glob(".interp-*"))  # the lock is released and removed, no temporary file is left
