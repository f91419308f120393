"""Compress in a 2-process gloo group: every rank ends with the same model as one process makes.

Each rank fits its share of the layers (balanced by cost) and receives the others' by broadcast;
with the same calibration data, the result must equal the single-process compress tensor for tensor."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from blastfx.build import distributed


def _model(seed=0):
    torch.manual_seed(seed)
    blocks = [torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 48)) for _ in range(3)]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(48, 64))


def _compress(model, **config):
    import blastfx

    torch.manual_seed(1)
    batches = [torch.randn(16, 48) for _ in range(4)]
    include = ("*.0", "*.2", "3")
    return blastfx.compress(model, 0.5, calibration=batches,
                            config=blastfx.BlastConfig(include=include, progress=False, iters=5, **config))


def _worker(rank, port, out_dir, config):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = _compress(_model(), **config)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
        torch.save(distributed.world(), os.path.join(out_dir, f"world{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("config", [{}, {"init": "random"}], ids=["factorize", "random"])
def test_two_gloo_ranks_end_with_the_single_process_model(tmp_path, config):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), config), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert [torch.load(tmp_path / f"world{r}.pt") for r in range(2)] == [(0, 2), (1, 2)]
    assert ranks[0].keys() == ranks[1].keys()
    assert any(k.endswith(".U") for k in ranks[0])                    # layers were compressed
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k               # every rank holds the same model
    if not config:
        torch.set_num_threads(1)
        single = _compress(_model()).state_dict()
        assert single.keys() == ranks[0].keys()
        for k in single:     # the fitting is the same computation, only on another process
            torch.testing.assert_close(ranks[0][k], single[k], rtol=1e-5, atol=1e-6)


def test_assign_balances_costs_and_is_the_same_everywhere():
    costs = [5.0, 3.0, 3.0, 2.0, 2.0, 1.0]
    owner = distributed.assign(costs, 2)
    assert owner == distributed.assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert sorted(loads) == [8.0, 8.0]
    assert distributed.assign(costs, 1) == [0] * len(costs)


def test_outside_a_process_group_there_is_one_rank():
    assert distributed.world() == (0, 1)


def test_distribute_must_be_a_bool():
    import blastfx

    with pytest.raises(ValueError, match="distribute"):
        blastfx.BlastConfig(distribute="yes")
