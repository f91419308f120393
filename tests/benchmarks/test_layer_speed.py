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


def test_ss1_path_times_keep_each_paths_best_config():
    """--paths: one time per SS1 path, the fastest of that path's configs, every config run for real
    (on the CPU under the Triton interpreter) and equal to the float64 product."""
    import torch
    from blastfx.structures.ss1 import SS1Layout
    from blastfx.structures.ss1 import kernel as ss1_kernel
    from blastfx.structures.ss1.ops import ss1_to_dense

    layout = SS1Layout(32, 128, 2, block_k=32, block_n=16)
    ws = [torch.randn(*layout.weight_shape) for _ in range(2)]
    x = torch.randn(16, 128)
    cfgs = ss1_kernel.candidates(16, layout.block_n, layout.block_k, 2, layout.vec)
    fake_ms = iter(range(len(cfgs), 0, -1))              # each config "faster" than the one before
    last = {c.get("path", "kernel"): len(cfgs) - i for i, c in enumerate(cfgs)}
    outputs = []

    def timer(fn, copies):
        outputs.append([fn(k) for k in range(copies)])
        return float(next(fake_ms))

    best = layer_speed.ss1_path_times(x, ws, layout, layout.shifts(), timer=timer)
    assert best == {path: float(t) for path, t in last.items()}
    assert {"dense", "kernel", "fold"} <= set(best)
    assert len(outputs) == len(cfgs)
    for per_copy in outputs:
        for w, y in zip(ws, per_copy):
            want = x.double() @ ss1_to_dense(w.double(), layout).T
            assert (y.double() - want).abs().max() < 1e-4 * want.abs().max()
