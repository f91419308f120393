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


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(48, 96), torch.nn.Linear(96, 48)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class _Chain(torch.nn.Module):
    """Blocks called one after another on one stream: sequential mode reconstructs each."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Residual() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _chain(seed=0):
    torch.manual_seed(seed)
    return _Chain()


def _compress(model, include=("*.0", "*.2", "3"), **config):
    import blastfx

    torch.manual_seed(1)
    batches = [torch.randn(16, 48) for _ in range(4)]
    return blastfx.compress(model, 0.5, calibration=batches,
                            config=blastfx.BlastConfig(include=include, progress=False, iters=5, **config))


def _worker(rank, port, out_dir, config, uneven=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        if uneven:      # each rank's reconstruction ends elsewhere, as float rounding may make it on GPUs
            import blastfx.sequential as seq
            real = seq.reconstruct_block

            def drifting(block, *args, **kwargs):
                out = real(block, *args, **kwargs)
                with torch.no_grad():
                    for p in block.parameters():
                        p.add_(1e-3 * (rank + 1))
                return out
            seq.reconstruct_block = drifting
        model = _compress(_chain(), include=("*",), **config) if uneven else _compress(_model(), **config)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
        torch.save(distributed.world(), os.path.join(out_dir, f"world{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_block_reconstruction_ends_the_same_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), {"sequential": True}, True), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert sum(k.endswith(".U") for k in ranks[0]) == 6                  # every block was compressed
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k


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
