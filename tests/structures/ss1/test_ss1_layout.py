"""SS1 geometry, parameter count and the hash (determinism, independence from RNGs, rotation rule)."""
import pytest
import torch

import blastfx  # noqa: F401  (registers the ops)
from blastfx.structures.ss1 import SS1Layout, ss1_params
from blastfx.structures.ss1.layout import _mul32, mix32
from ss1_oracles import mix32_int, shifts_oracle


@pytest.mark.parametrize("out_f,in_f,r,bk,bn", [(100, 200, 2, 32, 64), (70, 100, 4, 16, 16), (33, 64, 1, 32, 16),
                                                (64, 1000, 8, 32, 32), (5, 17, 2, 16, 16)])
def test_sizes(out_f, in_f, r, bk, bn):
    L = SS1Layout(out_f, in_f, r, block_k=bk, block_n=bn)
    k_tiles = -(-in_f // bk)
    assert L.k_tiles == k_tiles and L.n_tiles == -(-out_f // bn)
    assert L.shared_tiles == -(-k_tiles // r)
    assert L.weight_shape == (out_f, L.shared_tiles * bk)
    assert L.num_params == out_f * L.shared_tiles * bk
    assert ss1_params(out_f, in_f, r, block_k=bk) == L.num_params


def test_params_shrink_by_the_reduction():
    for r in (1, 2, 4, 8, 16):
        assert ss1_params(4096, 4096, r) * r == 4096 * 4096


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction=3), "reduction must be a power of two"),
    (dict(reduction=0), "reduction must be a positive integer"),
    (dict(reduction=True), "reduction must be a positive integer"),
    (dict(reduction=16), r"reduction=16 exceeds the 7 input tiles"),
    (dict(block_k=8), "block_k must be a power of two >= 16"),
    (dict(block_k=48), "block_k must be a power of two"),
    (dict(block_n=100), "block_n must be a power of two"),
    (dict(vec=64), "vec=64 must not exceed block_k=32"),
    (dict(vec=3), "vec must be a power of two"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(seed=2 ** 63), "seed must be below 2\\*\\*63"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(out_features=0), "out_features must be a positive integer"),
    (dict(in_features=2.0), "in_features must be a positive integer"),
])
def test_invalid_geometry(kwargs, match):
    args = dict(out_features=100, in_features=200, reduction=2) | kwargs
    with pytest.raises(ValueError, match=match):
        SS1Layout(**args)
    if set(kwargs) <= {"reduction", "block_k", "out_features", "in_features"}:
        with pytest.raises(ValueError, match=match):
            ss1_params(args["out_features"], args["in_features"], args["reduction"], block_k=args.get("block_k", 32))


def test_mul32_and_mix32_match_python_integers():
    g = torch.Generator().manual_seed(1)
    xs = torch.cat([torch.randint(0, 2 ** 32, (2000,), generator=g, dtype=torch.int64),
                    torch.tensor([0, 1, 2 ** 16 - 1, 2 ** 16, 2 ** 32 - 1, 2 ** 31, 2 ** 31 - 1])])
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF, 1):
        assert _mul32(xs, c).tolist() == [(x * c) & 0xFFFFFFFF for x in xs.tolist()]
    assert mix32(xs).tolist() == [mix32_int(x) for x in xs.tolist()]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2 ** 40 + 7, 2 ** 63 - 1])
@pytest.mark.parametrize("out_f,in_f,r,bk,vec", [(100, 200, 2, 32, 8), (70, 300, 8, 32, 8), (40, 64, 4, 16, 2),
                                                 (16, 64, 1, 16, 16)])
def test_shifts_follow_the_documented_rule(seed, out_f, in_f, r, bk, vec):
    L = SS1Layout(out_f, in_f, r, seed=seed, block_k=bk, block_n=16, vec=vec)
    s = L.shifts()
    assert s.dtype == torch.int64 and tuple(s.shape) == (L.k_tiles, L.n_tiles)
    assert torch.equal(s, shifts_oracle(L))
    assert bool(((s % vec) == 0).all()) and int(s.min()) >= 0 and int(s.max()) < bk


def test_rotations_in_a_group_are_distinct_while_there_are_enough():
    G = 32 // 8
    for r in (2, 4, 8, 16):
        L = SS1Layout(128, 32 * r * 3, r, seed=9, block_n=16)
        s = L.shifts().view(L.shared_tiles, r, L.n_tiles)
        for g in range(L.shared_tiles):
            for j in range(L.n_tiles):
                rots = s[g, :, j].tolist()
                for start in range(0, r, G):            # each round of G tiles uses G distinct rotations
                    chunk = rots[start:start + G]
                    assert len(set(chunk)) == len(chunk)


def test_hash_is_deterministic_and_seed_dependent():
    a = SS1Layout(256, 512, 4, seed=7).shifts()
    torch.manual_seed(123)                                # no global RNG is involved
    torch.randn(10)
    b = SS1Layout(256, 512, 4, seed=7).shifts()
    c = SS1Layout(256, 512, 4, seed=8).shifts()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # spread: every rotation occurs, the per-output-tile patterns differ
    assert set(a.unique().tolist()) == {0, 8, 16, 24}
    assert not all(torch.equal(a[:, 0], a[:, j]) for j in range(1, a.shape[1]))


def test_shifts_are_a_private_copy_and_ignore_a_meta_device_context():
    L = SS1Layout(64, 128, 2, seed=3)
    s = L.shifts()
    s.fill_(5)
    assert not torch.equal(L.shifts(), s)
    with torch.device("meta"):
        fresh = SS1Layout(64, 128, 2, seed=4).shifts()
    assert fresh.device.type == "cpu" and torch.equal(fresh, shifts_oracle(SS1Layout(64, 128, 2, seed=4)))


def test_slot_index_ties_every_column_to_one_slot_of_its_group():
    L = SS1Layout(80, 200, 4, seed=2, block_k=16, block_n=32)
    slots = L.slot_index()
    assert tuple(slots.shape) == (L.n_tiles, L.in_features)
    k = torch.arange(L.in_features)
    assert torch.equal(slots // L.block_k, (k // L.block_k // L.reduction).expand_as(slots))
    # within one output tile, the tiles of a group hit every slot of the shared tile once each
    for j in range(L.n_tiles):
        for i in range(L.k_tiles):
            cols = slots[j, i * 16:(i + 1) * 16]
            if cols.numel() == 16:
                assert sorted((cols % 16).tolist()) == list(range(16))
