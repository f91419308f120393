"""benchmarks/layer_speed.py: the SS1 rows time a layer at the budget they are labelled with."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import layer_speed  # noqa: E402


def test_ss1_reduction_keeps_exactly_the_budget():
    assert [layer_speed.ss1_reduction(b) for b in (0.5, 0.25, 0.125)] == [2, 4, 8]
    for budget in (0.8, 1.0, 0.3, 0.375):       # 1/0.8 rounds to 1 (a dense-sized layer); 3, 8/3: no power of two
        assert layer_speed.ss1_reduction(budget) is None
