"""benchmarks/decode_stages.py: the --sweep of each stage's configs, the copy bandwidth, and the launch
model fitted on dense GEMVs."""
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import decode_stages  # noqa: E402


def test_sweep_keeps_the_fastest_configs_of_each_stage(monkeypatch):
    calls = []

    def fake_gemv(x, U, S, V, bias, shape, cfg, only_stage):
        calls.append((only_stage, cfg))
        if cfg.get("BQ") == 256 and only_stage == 1:
            raise RuntimeError("out of resources")               # a config the GPU cannot run is skipped
        return cfg

    def fake_graph_ms(fn, copies):
        cfg = fn(0)
        tile = cfg["BQ"] * cfg["BR"] if calls[-1][0] == 1 else cfg["BP"] * cfg["BK"]
        return 1e-3 * (1 + abs(tile - 16384) / 16384) / cfg["warps"]   # fastest: 16K-element tiles, 8 warps

    monkeypatch.setattr(decode_stages.gemv, "blast_gemv", fake_gemv)
    monkeypatch.setattr(decode_stages, "graph_ms", fake_graph_ms)
    metrics, lines = decode_stages.sweep(None, [("U", "S", "V")], None, v_bytes=8e6, u_bytes=4e6, keep=3)
    assert {stage for stage, _ in calls} == {1, 2}
    assert all(cfg["mode"] == "two" for _, cfg in calls)
    failing = sum(c["BQ"] == 256 for c in decode_stages.STAGE1_SWEEP)
    assert failing and len(lines) == len(decode_stages.STAGE1_SWEEP) - failing + len(decode_stages.STAGE2_SWEEP)
    names = [name for name, _, _ in metrics]
    assert len(metrics) == 2 * 2 * 3
    first = names[0]
    assert first.startswith("stage 1 ") and first.endswith(" time") and "warps=8" in first
    assert int(first.split("BQ=")[1].split()[0]) * int(first.split("BR=")[1].split()[0]) == 16384
    times = [v for name, v, unit in metrics if name.startswith("stage 1") and unit == "ms"]
    assert times == sorted(times)
    bandwidth = next(v for name, v, unit in metrics if unit == "GB/s")
    assert bandwidth == round(8e6 / times[0] / 1e6)


def test_copy_bandwidth_counts_read_and_write_over_rotated_buffers(monkeypatch):
    seen = []

    def fake_graph_ms(fn, copies):
        for k in range(copies):
            seen.append(fn(k).data_ptr())                           # copy_ returns its destination
        return 1.0                                                  # 1 ms per copy

    monkeypatch.setattr(decode_stages, "graph_ms", fake_graph_ms)
    assert decode_stages.copy_gbs(2_000_000, device="cpu") == 2 * 2_000_000 / 1e-3 / 1e9   # 4 MB in 1 ms
    assert len(seen) >= 4 and len(set(seen)) == len(seen)          # every call its own buffer


def test_launch_model_recovers_a_known_fixed_cost_and_bandwidth():
    t0, bandwidth = 4.4e-3, 3.8e9                                   # 4.4 us per launch, 3.8 TB/s (bytes per ms)
    points = [(b, t0 + b / bandwidth) for b in (8e6, 16e6, 33e6, 67e6, 134e6)]
    fit_t0, fit_bw = decode_stages.fit_launch_model(points)
    assert abs(fit_t0 - t0) < 1e-9 and abs(fit_bw / bandwidth - 1) < 1e-9


def test_launch_ceilings_charge_each_launch_the_fixed_cost():
    model = (4e-3, 4e9)                                             # 4 us per launch, 4 TB/s
    t_dense = 4e-3 + 32e6 / 4e9                                     # 12 us for 32 MB
    assert decode_stages.ceiling(t_dense, model, 16e6, 1) == pytest.approx(1.5)         # half the bytes: not 2x
    assert decode_stages.ceiling(t_dense, model, 16e6, 2) == pytest.approx(1.0)


def test_launch_model_refuses_points_it_cannot_fit():
    with pytest.raises(ValueError, match="two sizes"):
        decode_stages.fit_launch_model([(8e6, 1e-2), (8e6, 1.1e-2)])
    with pytest.raises(ValueError, match="do not grow"):
        decode_stages.fit_launch_model([(8e6, 2e-2), (16e6, 1e-2)])


def test_launch_model_times_each_dense_size_over_rotated_weights(monkeypatch):
    seen = []

    def fake_graph_ms(fn, copies):
        y = fn(0)                                                   # the GEMV's output: (T, out)
        seen.append((y.shape, copies))
        return 2e-3 + y.shape[1] * 64 * 2 / 3e9                    # 2 us + bytes at 3 TB/s

    monkeypatch.setattr(decode_stages, "graph_ms", fake_graph_ms)
    (t0, bw), metrics = decode_stages.launch_model(2, 64, torch.float32, "cpu", rows=(16, 32, 128))
    assert [shape for shape, _ in seen] == [(2, 16), (2, 32), (2, 128)]
    assert all(copies >= 4 for _, copies in seen)
    assert abs(t0 - 2e-3) < 1e-12 and abs(bw / 3e9 - 1) < 1e-9
    named = {name: (v, unit) for name, v, unit in metrics}
    assert named["fixed cost per launch"] == (2.0, "us") and named["marginal bandwidth"] == (3000, "GB/s")
