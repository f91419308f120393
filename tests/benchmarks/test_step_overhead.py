"""benchmarks/step_overhead.py on a tiny Llama on the CPU: every variant compiles, its three step
timings and its guard check are recorded as rows, and a run without dense is refused."""
import csv
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import step_overhead  # noqa: E402

TINY = {"tiny": dict(hidden=64, inter=128, heads=4, kv_heads=2, vocab=256)}


@pytest.mark.requires("transformers")
def test_rows_for_every_variant(tmp_path, monkeypatch):
    monkeypatch.setattr(step_overhead, "SHAPES", TINY)
    monkeypatch.setattr(sys, "argv", ["step_overhead.py", "--model", "tiny", "--layers", "2", "--new-tokens", "8",
                                      "--results-dir", str(tmp_path)])
    step_overhead.main()
    with open(tmp_path / "step_overhead.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["case"] for r in rows} == {"tiny, 2 layers, decode step at batch 1"}
    assert json.loads(rows[0]["config"])["layers"] == 2
    metrics = {r["metric"]: (float(r["value"]), r["unit"]) for r in rows}
    for variant in step_overhead.VARIANTS:
        for timing in ("step CPU time", "step with sync", "step in a loop"):
            value, unit = metrics[f"{variant} {timing}"]
            assert unit == "ms" and 0 < value < 60_000
        value, unit = metrics[f"{variant} guard check"]
        assert unit == "µs" and value > 0
    assert len(metrics) == 4 * len(step_overhead.VARIANTS)


@pytest.mark.parametrize("argv, message", [(["--variants", "blastfx"], "include dense"),
                                           (["--new-tokens", "5"], "at least 8 steps")])
def test_bad_arguments_are_refused(monkeypatch, argv, message):
    monkeypatch.setattr(sys, "argv", ["step_overhead.py", *argv])
    with pytest.raises(SystemExit, match=message):
        step_overhead.main()
