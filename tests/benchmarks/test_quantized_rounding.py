"""benchmarks/quantized_rounding.py: its error measure and the rank it fits at a budget."""
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import quantized_rounding  # noqa: E402


def test_output_errors_are_relative_to_the_weight_on_the_covariance():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    C = (X.T @ X).expand(2, 5, 5)
    torch.testing.assert_close(quantized_rounding.output_errors(W, W, C), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(quantized_rounding.output_errors(W, torch.zeros_like(W), C),
                               torch.ones(2, dtype=torch.float64))
    half = quantized_rounding.output_errors(W, 0.5 * W, C)          # E = W / 2: half the output, any C
    torch.testing.assert_close(half, torch.full((2,), 0.5, dtype=torch.float64))
    E = W.clone()
    E[:, 0] += 1.0
    want = [((W[k] - E[k]) @ X.T).norm() / (W[k] @ X.T).norm() for k in range(2)]
    torch.testing.assert_close(quantized_rounding.output_errors(W, E, C), torch.stack(want))


def test_rank_for_keeps_the_budget_in_parameters():
    for m, n, budget in ((1536, 576, 0.5), (576, 1536, 0.8), (4096, 4096, 0.5)):
        r = quantized_rounding.rank_for(budget, m, n, 4)
        assert r % 8 == 0
        assert r * (m + n + 16) <= budget * m * n < (r + 8) * (m + n + 16)
