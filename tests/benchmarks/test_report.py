"""benchmarks/report.py: RESULTS.md holds the latest value per case and metric, under its provenance."""
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import rows  # noqa: E402

H100 = dict(commit="1111111", device="NVIDIA H100 80GB HBM3", torch="2.11.0+cu130", triton="3.6.0",
            transformers="5.17.0")
H200 = dict(commit="2222222", device="NVIDIA H200", torch="2.11", triton="3.6", transformers="")


def layer(T, b, value, **prov):
    return rows.measurements(f"4096x4096 b={b} T={T}", {"out": 4096, "in": 4096, "b": b, "T": T},
                             [("blastfx vs dense", value, "x")])


def stamp(rs, date, command, prov):
    return [dict(r, date=date, command=command, **prov) for r in rs]


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    old = "python benchmarks/layer_speed.py --tokens 1 16"
    rows.record("layer_speed", stamp(layer(1, 4, 1.04) + layer(16, 4, 1.07) + layer(1, 16, 0.73), "2026-11-23",
                                     old, H100), directory=d)
    rows.record("layer_speed", stamp(layer(1, 4, 0.93) + layer(16, 4, 0.95), "2026-11-30",
                                     "python benchmarks/layer_speed.py", H200), directory=d)
    q = "python benchmarks/quality_smollm2.py --budgets 0.8 0.5 --methods blastfx"
    for budget, x, ppl in ((0.8, 3.81, 93.81), (0.5, 34.79, 856.89)):
        rows.record("quality_smollm2", stamp(rows.measurements(
            f"{budget} blastfx", {"budget": budget, "method": "blastfx"},
            [("perplexity", ppl, ""), ("x dense", x, "x")]), "2026-11-23", q, H100), directory=d)
    rows.record("quality_smollm2", stamp(rows.measurements(
        "0.8 blastfx iters=100", {"budget": 0.8, "method": "blastfx", "iters": 100},
        [("perplexity", 63.29, ""), ("x dense", 2.57, "x")]), "2026-11-24", q + " --iters 100", H100), directory=d)
    rows.record("recovery_smollm2", stamp(rows.measurements(
        "0.8 blastfx, KD 3 min", {"budget": 0.8}, [("x dense after KD", 1.42, "x"), ("tokens", 3817472, "")]),
        "2026-11-23", "python benchmarks/recovery_smollm2.py", H100), directory=d)
    return d


def sections(text):
    """{heading: body} of the ## sections."""
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {p.splitlines()[0]: p for p in parts}


def table_rows(body):
    return [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| ") and not line.startswith("| case")]


def test_report_shows_the_latest_value_per_case_with_its_provenance(results, tmp_path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results-dir", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    secs = sections(text)
    layer_sec = secs["One layer at 50% of its parameters (`layer_speed`)"]
    h200, h100 = layer_sec.split("**NVIDIA H200**")[1].split("**NVIDIA H100 80GB HBM3**")
    # the H200 table (newest first): its two cases
    assert "torch 2.11, triton 3.6 · 2026-11-30 · commit 2222222" in h200
    assert "    python benchmarks/layer_speed.py\n" in h200
    assert table_rows(h200) == [["4096x4096 b=4 T=1", "0.93"], ["4096x4096 b=4 T=16", "0.95"]]
    assert "| case | blastfx vs dense (x) |" in h200
    # the H100 table keeps its own cases: a timing on another GPU replaces none of them
    assert "torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0 · 2026-11-23 · commit 1111111" in h100
    assert "python benchmarks/layer_speed.py --tokens 1 16" in h100
    assert table_rows(h100) == [["4096x4096 b=4 T=1", "1.04"], ["4096x4096 b=4 T=16", "1.07"],
                                ["4096x4096 b=16 T=1", "0.73"]]
    # two commands in one table: numbered, and each case says which reproduces it
    qual = secs["Quality without retraining: SmolLM2-135M-Instruct (`quality_smollm2`)"]
    assert "    python benchmarks/quality_smollm2.py --budgets 0.8 0.5 --methods blastfx  # 1" in qual
    assert "    python benchmarks/quality_smollm2.py --budgets 0.8 0.5 --methods blastfx --iters 100  # 2" in qual
    assert "| case | perplexity | x dense | command |" in qual          # "x dense" names its unit already
    assert table_rows(qual) == [["0.8 blastfx", "93.81", "3.81", "1"], ["0.5 blastfx", "856.89", "34.79", "1"],
                                ["0.8 blastfx iters=100", "63.29", "2.57", "2"]]
    assert "2026-11-23, 2026-11-24" in qual
    rec = secs["Recovery by distillation: SmolLM2-135M-Instruct (`recovery_smollm2`)"]
    assert table_rows(rec) == [["0.8 blastfx, KD 3 min", "1.42", "3,817,472"]]
    # sections in registry order, each with the sentence saying what its numbers mean
    assert list(secs) == ["Quality without retraining: SmolLM2-135M-Instruct (`quality_smollm2`)",
                          "Recovery by distillation: SmolLM2-135M-Instruct (`recovery_smollm2`)",
                          "One layer at 50% of its parameters (`layer_speed`)"]
    assert report.REGISTRY["layer_speed"].reading in layer_sec
    # plots beside it, linked from their sections
    for name in (report.SPEED_PLOT, report.QUALITY_PLOT):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![layer_speed]({report.SPEED_PLOT})" in layer_sec
    assert f"![quality_smollm2]({report.QUALITY_PLOT})" in qual


def test_plot_series_from_the_latest_rows(results):
    data = report.load(results)
    speed = report.speed_series(data["layer_speed"])
    assert speed == {"4096x4096 b=4 (NVIDIA H100 80GB HBM3)": [(1.0, 1.04), (16.0, 1.07)],
                     "4096x4096 b=16 (NVIDIA H100 80GB HBM3)": [(1.0, 0.73)],
                     "4096x4096 b=4 (NVIDIA H200)": [(1.0, 0.93), (16.0, 0.95)]}
    quality = report.quality_series(data["quality_smollm2"], data["recovery_smollm2"])
    assert quality == {"blastfx": [(0.5, 34.79), (0.8, 2.57)],          # the best case of the method per budget
                       "after distillation (best)": [(0.8, 1.42)]}


def test_check_flags_a_stale_file(results, tmp_path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results-dir", str(results), "--out", str(out), "--check"]) == 1      # absent
    report.main(["--results-dir", str(results), "--out", str(out)])
    assert report.main(["--results-dir", str(results), "--out", str(out), "--check"]) == 0
    rows.record("layer_speed", stamp(layer(1, 4, 0.99), "2026-12-01", "python benchmarks/layer_speed.py", H200),
                directory=results)
    assert report.main(["--results-dir", str(results), "--out", str(out), "--check"]) == 1


def test_same_date_later_row_wins():
    base = dict(benchmark="b", case="c", config="{}", metric="m", unit="", date="2026-11-30", **H200, command="x")
    got = report.latest([dict(base, value="1"), dict(base, value="2"), dict(base, date="2026-11-29", value="3")])
    assert [r["value"] for r in got] == ["2"]


def test_a_timing_on_another_gpu_hides_nothing_a_quality_number_is_replaced():
    base = dict(benchmark="b", case="c", config="{}", metric="m", unit="", **H200, command="x")
    other = dict(base, device="NVIDIA H100 80GB HBM3", date="2026-12-01", value="2")
    runs = [dict(base, date="2026-11-30", value="1"), other, dict(base, date="2026-11-29", value="3")]
    got = report.latest(runs, per_device=True)
    assert sorted((r["device"], r["value"]) for r in got) == [(other["device"], "2"), (H200["device"], "1")]
    assert [r["value"] for r in report.latest(runs)] == ["2"]
    assert report.timed_on_gpu("layer_speed") and report.timed_on_gpu("llama_e2e_kernels")
    assert not report.timed_on_gpu("quality_smollm2") and not report.timed_on_gpu("unregistered")


@pytest.mark.parametrize("value, shown", [("0.93", "0.93"), ("3", "3"), ("1305979.16", "1,305,979"),
                                          ("1004.96", "1,005"), ("0.0161", "0.0161"), ("fused_bmm", "fused_bmm"),
                                          ("a|b", "a\\|b")])
def test_value_format(value, shown):
    assert report.fmt(value) == shown


def test_the_committed_results_md_is_generated_from_the_csvs():
    """RESULTS.md is never edited by hand: regenerate it with python benchmarks/report.py."""
    assert report.main(["--check"]) == 0
    text = (BENCH / "RESULTS.md").read_text()
    for word in ("session", "section", "borrowed", "not re-run", "who ran"):
        assert word not in text.lower()
