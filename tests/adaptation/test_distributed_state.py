"""Two gloo processes: memory banks and class statistics end identical on both ranks and equal to one process
updating on the rank-ordered concatenated batches."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from uda_ray.adaptation import ClassStatistics, MemoryBank

CLASSES, DIM = 5, 4


def _batches(rank):
    """Two steps of per-rank batches of unequal size; class 4 appears on rank 1 only, in the first step only."""
    out = []
    for step in range(2):
        g = torch.Generator().manual_seed(100 * step + rank)
        n = 7 + 5 * rank + step
        feats = torch.randn(n, DIM, generator=g)
        labels = torch.randint(0, 4, (n,), generator=g)
        labels[0] = 255
        if rank == 1 and step == 0:
            labels[1:3] = 4
        out.append((feats, labels))
    return out


def _states():
    return {"centroid": MemoryBank(CLASSES, DIM, 1, 0.8), "queue": MemoryBank(CLASSES, DIM, 3, 0.8),
            "stats": ClassStatistics(CLASSES, DIM)}


def _worker(rank, world, init, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        states = _states()
        for feats, labels in _batches(rank):
            for module in states.values():
                module.update(feats, labels)
        torch.save({k: m.state_dict() for k, m in states.items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_hold_identical_state(tmp_path):
    init = f"file://{tmp_path}/rendezvous"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _states()
    for (f0, y0), (f1, y1) in zip(_batches(0), _batches(1)):
        for module in single.values():
            module.update(torch.cat([f0, f1]), torch.cat([y0, y1]))
    for name, module in single.items():
        for key, want in module.state_dict().items():
            assert torch.equal(got[0][name][key], got[1][name][key]), f"{name}.{key} differs between ranks"
            torch.testing.assert_close(got[0][name][key], want, rtol=1e-6, atol=1e-6, msg=f"{name}.{key}")
    assert got[0]["centroid"]["fill"][4] == 1 and got[0]["stats"]["count"][4] == 2  # rank 1's class reached rank 0
    assert got[0]["queue"]["fill"].tolist()[:4] == [3, 3, 3, 3]
