"""benchmarks/decode_stages.py --sweep: every config of each stage timed alone, the fastest kept as rows."""
import sys
from pathlib import Path

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
