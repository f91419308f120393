"""Independent constructions of the SS1 tie pattern for the SS1 tests (plain Python integers and
loops, float64), so a bug in the vectorised code cannot hide behind itself."""
import math

import torch

M32 = 0xFFFFFFFF


def mix32_int(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def shifts_oracle(layout) -> torch.Tensor:
    """The shift table from the rule in the layout docstring, one Python integer at a time."""
    r, G = layout.reduction, layout.block_k // layout.vec
    rounds = math.ceil(r / G)
    seed_h = mix32_int(mix32_int(layout.seed & M32) ^ (layout.seed >> 32))
    table = torch.zeros(layout.k_tiles, layout.n_tiles, dtype=torch.int64)
    for g in range(layout.shared_tiles):
        for j in range(layout.n_tiles):
            order = []
            for rnd in range(rounds):
                keys = [mix32_int(mix32_int(mix32_int(mix32_int(seed_h ^ g) ^ j) ^ rnd) ^ q) for q in range(G)]
                order += sorted(range(G), key=lambda q: (keys[q], q))
            for t in range(r):
                i = g * r + t
                if i < layout.k_tiles:
                    table[i, j] = order[t] * layout.vec
    return table


def dense_oracle(shared: torch.Tensor, layout) -> torch.Tensor:
    """W[n, i*bk + c] = shared[n, g*bk + (c - s[i, n // bn]) mod bk], entry by entry, in float64."""
    s = layout.shifts().tolist()
    bk, bn, r = layout.block_k, layout.block_n, layout.reduction
    sh = shared.double()
    W = torch.zeros(layout.out_features, layout.in_features, dtype=torch.float64)
    for n in range(layout.out_features):
        for k in range(layout.in_features):
            i, c = divmod(k, bk)
            W[n, k] = sh[n, (i // r) * bk + (c - s[i][n // bn]) % bk]
    return W


def tie_matrix(layout) -> torch.Tensor:
    """A (out*in, out*shared_in) float64 0/1 matrix with vec(W) = A vec(shared) (row-major vecs),
    built from the same entry rule as :func:`dense_oracle`."""
    s = layout.shifts().tolist()
    bk, bn, r = layout.block_k, layout.block_n, layout.reduction
    n_in, ks = layout.in_features, layout.shared_in_features
    A = torch.zeros(layout.out_features * n_in, layout.out_features * ks, dtype=torch.float64)
    for n in range(layout.out_features):
        for k in range(n_in):
            i, c = divmod(k, bk)
            A[n * n_in + k, n * ks + (i // r) * bk + (c - s[i][n // bn]) % bk] = 1.0
    return A
