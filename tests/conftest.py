import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():          # Triton kernels run in the interpreter on CPU (tiny shapes only)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def dense_from_blocks(U, S, V, m, n):
    """An independent float64 construction of the BLAST matrix, block by block (test oracle)."""
    b_out, p, r = U.shape
    b_in, q, _ = V.shape
    A = torch.zeros(b_out * p, b_in * q, dtype=torch.float64)
    for i in range(b_out):
        for j in range(b_in):
            A[i * p:(i + 1) * p, j * q:(j + 1) * q] = U[i].double() @ torch.diag(S[i, j].double()) @ V[j].double().T
    return A[:m, :n]


def spectrum_matrix(m, n, decay=0.5, seed=0, dtype=torch.float32):
    """Random singular vectors, sigma_k = k^-decay."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    P, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    sigma = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    return ((P * sigma) @ Q.T).to(dtype)
