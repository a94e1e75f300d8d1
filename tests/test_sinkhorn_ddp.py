"""Sinkhorn-Knopp across 2 real processes (gloo on CPU): each holds part of a batch, and together they must
return exactly the rows that one process computes on the whole batch. Also the iBOT center update.

Started with `torch.multiprocessing.start_processes` (spawn), MASTER_ADDR 127.0.0.1 and a free port; no
launcher needed. The workers write their results to files; the assertions run here, in the parent.
"""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_from_scratch.sinkhorn import sinkhorn_knopp

WORLD = 2
TIMEOUT_S = 60
# splits of a batch of 16 over the 2 ranks: even halves, uneven (as masked-patch counts are in iBOT), and a
# rank without samples (it must still join every collective)
SPLITS = {"even": (8, 8), "uneven": (5, 11), "empty": (0, 16)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    protos = torch.nn.functional.normalize(torch.randn(32, 8, generator=g), dim=-1)
    return logits @ protos.t()                                                    # [16, 32] cosine scores


def _worker(rank: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        S = _batch()
        res = {}
        for name, sizes in SPLITS.items():
            start = sum(sizes[:rank])
            local = S[start:start + sizes[rank]]
            for stable in (True, False):
                res[f"{name}/stable={stable}"] = sinkhorn_knopp(local, 0.05, stable=stable)
        # a score range where the official form overflows: only the stable one is compared
        res["hot"] = sinkhorn_knopp(S[rank * 8:(rank + 1) * 8] * 10, 0.01)
        # iBOT: the center moves by the mean over all masked tokens of all processes
        from dino_from_scratch.ibot import IBOTConfig, IBOTPatchLoss
        loss = IBOTPatchLoss(IBOTConfig(out_dim=32))
        loss.update_center(S[:5] if rank == 0 else S[5:])
        res["ibot_center"] = loss.center.clone()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sinkhorn_ddp")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} processes did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive(): p.kill()
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("stable", [True, False])
def test_two_processes_equal_one(ddp_results, split, stable):
    S = _batch()
    whole = sinkhorn_knopp(S, 0.05, stable=stable)                                  # one process, whole batch
    both = torch.cat([r[f"{split}/stable={stable}"] for r in ddp_results])         # rows of rank 0, then rank 1
    assert both.shape == whole.shape
    torch.testing.assert_close(both, whole, atol=1e-5, rtol=0)
    if 0 in SPLITS[split]: return
    # sanity: the split changes nothing only because sums were all-reduced; the local-only result differs
    local_only = torch.cat([sinkhorn_knopp(part, 0.05, stable=stable) for part in S.split(SPLITS[split])])
    assert (local_only - whole).abs().max() > 1e-3


def test_stable_form_distributed_where_plain_overflows(ddp_results):
    S = _batch()
    whole = sinkhorn_knopp(S * 10, 0.01)
    assert not sinkhorn_knopp(S * 10, 0.01, stable=False).isfinite().all()         # exp(1000) overflows
    both = torch.cat([r["hot"] for r in ddp_results])
    assert both.isfinite().all()
    torch.testing.assert_close(both, whole, atol=1e-5, rtol=0)


def test_ibot_center_is_the_global_token_mean(ddp_results):
    S = _batch()
    c0, c1 = (r["ibot_center"] for r in ddp_results)
    torch.testing.assert_close(c0, c1, atol=0, rtol=0)                             # same center on every rank
    expected = (0.1 * S.mean(0)).reshape(1, 1, -1)                                  # momentum 0.9 from a zero center
    torch.testing.assert_close(c0, expected, atol=1e-6, rtol=0)
