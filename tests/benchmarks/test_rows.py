"""benchmarks/rows.py: results rows written whole or not at all, checked before anything is written."""
import csv
import json
import os
import re
import sys
import threading
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import rows  # noqa: E402

ELSEWHERE = dict(commit="abc1234", device="NVIDIA H200", torch="2.11", triton="3.6", transformers="",
                 date="2026-11-30", command="python benchmarks/layer_speed.py")


def layer_rows(T=1, value=0.93):
    return rows.measurements(f"4096x4096 b=4 T={T}", {"out": 4096, "in": 4096, "b": 4, "T": T},
                             [("blastfx vs dense", value, "x"), ("chosen path", "bmm_mix_bmm", "")])


def raw_lines(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_round_trip_with_header_and_provenance(tmp_path):
    path = rows.record("layer_speed", layer_rows(), directory=tmp_path, command="python benchmarks/layer_speed.py")
    assert path == tmp_path / "layer_speed.csv"
    assert raw_lines(path)[0] == list(rows.COLUMNS)
    got = rows.read(path)
    assert [(r["case"], r["metric"], r["value"], r["unit"]) for r in got] == [
        ("4096x4096 b=4 T=1", "blastfx vs dense", "0.93", "x"), ("4096x4096 b=4 T=1", "chosen path", "bmm_mix_bmm", "")]
    for r in got:
        assert r["benchmark"] == "layer_speed"
        assert json.loads(r["config"]) == {"out": 4096, "in": 4096, "b": 4, "T": 1}
        assert r["config"] == '{"T":1,"b":4,"in":4096,"out":4096}'          # compact, keys sorted
        assert r["command"] == "python benchmarks/layer_speed.py"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["date"])
        assert r["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", r["commit"])
        assert r["torch"] == rows.metadata.version("torch")
        assert r["device"]
    assert float(got[0]["value"]) == 0.93


def test_appends_keep_old_rows_and_one_header(tmp_path):
    rows.record("layer_speed", [dict(r, **ELSEWHERE) for r in layer_rows(1, 0.93)], directory=tmp_path)
    rows.record("layer_speed", [dict(r, **ELSEWHERE) for r in layer_rows(16, 0.91)], directory=tmp_path)
    lines = raw_lines(tmp_path / "layer_speed.csv")
    assert lines.count(list(rows.COLUMNS)) == 1
    got = rows.read(tmp_path / "layer_speed.csv")
    assert [r["case"] for r in got] == ["4096x4096 b=4 T=1"] * 2 + ["4096x4096 b=4 T=16"] * 2
    assert got[0]["device"] == "NVIDIA H200" and got[0]["date"] == "2026-11-30"   # given provenance is kept


def test_values_numbers_and_labels():
    assert rows._value(3, 0) == "3"
    assert rows._value(0.1 + 0.2, 0) == repr(0.1 + 0.2)        # floats round-trip exactly
    assert float(rows._value(__import__("numpy").float32(1.5), 0)) == 1.5
    assert rows._value("fused_bmm", 0) == "fused_bmm"
    for bad in (True, None, float("nan"), float("inf"), "", "two\nlines", object()):
        with pytest.raises(ValueError, match="value"):
            rows._value(bad, 0)


@pytest.mark.parametrize("missing", rows.REQUIRED)
def test_missing_required_key_is_named_and_nothing_written(tmp_path, missing):
    bad = layer_rows()
    del bad[1][missing]
    with pytest.raises(ValueError, match=f"rows\\[1\\] has no '{missing}'"):
        rows.record("layer_speed", bad, directory=tmp_path)
    assert not (tmp_path / "layer_speed.csv").exists()


@pytest.mark.parametrize("row, message", [
    (dict(case="c", config={}, metric="m", value=1, unit="", speed=2), "unknown key"),
    (dict(case="", config={}, metric="m", value=1, unit=""), "'case'.* is empty"),
    (dict(case="c", config="{not json", metric="m", value=1, unit=""), "'config'.*not JSON"),
    (dict(case="c", config=[1, 2], metric="m", value=1, unit=""), "'config'.*must be a dict"),
    (dict(case="c", config={"x": float("nan")}, metric="m", value=1, unit=""), "'config'.*not JSON-serializable"),
    (dict(case="c", config={}, metric="m", value=1, unit="", date="yesterday"), "date.*not an ISO date"),
    (dict(case="c", config={}, metric="m", value=1, unit=3), "'unit'.*must be a string"),
    (dict(case="c", config={}, metric="m", value=1, unit="", benchmark="other"), "benchmark"),
])
def test_bad_rows_are_refused_before_writing(tmp_path, row, message):
    rows.record("b", [dict(case="old", config={}, metric="m", value=1, unit="", **ELSEWHERE)], directory=tmp_path)
    before = (tmp_path / "b.csv").read_bytes()
    good = dict(case="ok", config={}, metric="m", value=2, unit="", **ELSEWHERE)
    with pytest.raises(ValueError, match=message):
        rows.record("b", [good, {**ELSEWHERE, **row}], directory=tmp_path)
    assert (tmp_path / "b.csv").read_bytes() == before           # the good row before it is not written either


@pytest.mark.parametrize("name", ["Layer", "../x", "", "a b", 3])
def test_bad_benchmark_name(tmp_path, name):
    with pytest.raises(ValueError, match="benchmark="):
        rows.record(name, layer_rows(), directory=tmp_path)


def test_rows_must_be_a_list_of_dicts(tmp_path):
    with pytest.raises(ValueError, match="list of dicts"):
        rows.record("b", layer_rows()[0], directory=tmp_path)
    with pytest.raises(ValueError, match=r"rows\[0\] must be a dict"):
        rows.record("b", [("c", "m")], directory=tmp_path)


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, error):
    rows.record("b", [dict(r, **ELSEWHERE) for r in layer_rows()], directory=tmp_path)
    before = (tmp_path / "b.csv").read_bytes()

    def broken_replace(src, dst):
        assert Path(src).read_text().count("\n") == 5           # the whole new file was written beside it
        raise error
    monkeypatch.setattr(rows.os, "replace", broken_replace)
    with pytest.raises(type(error)):
        rows.record("b", [dict(r, **ELSEWHERE) for r in layer_rows(16)], directory=tmp_path)
    assert (tmp_path / "b.csv").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["b.csv"]


def test_interrupted_while_writing_the_temporary(tmp_path, monkeypatch):
    rows.record("b", [dict(r, **ELSEWHERE) for r in layer_rows()], directory=tmp_path)
    before = (tmp_path / "b.csv").read_bytes()
    monkeypatch.setattr(rows.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        rows.record("b", [dict(r, **ELSEWHERE) for r in layer_rows(16)], directory=tmp_path)
    assert (tmp_path / "b.csv").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["b.csv"]


def test_foreign_header_is_not_overwritten(tmp_path):
    (tmp_path / "b.csv").write_text("name,value\nx,1\n")
    with pytest.raises(ValueError, match="header"):
        rows.record("b", layer_rows(), directory=tmp_path)
    assert (tmp_path / "b.csv").read_text() == "name,value\nx,1\n"


def test_concurrent_writers_lose_no_rows(tmp_path):
    def writer(k):
        for j in range(5):
            rows.record("b", [dict(case=f"w{k} {j}", config={}, metric="m", value=j, unit="", **ELSEWHERE)],
                        directory=tmp_path)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["case"] for r in rows.read(tmp_path / "b.csv")) == sorted(
        f"w{k} {j}" for k in range(6) for j in range(5))


def test_default_command_reproduces_the_script_call():
    argv = ["/x/benchmarks/layer_speed.py", "--tokens", "1", "16", "--results-dir", "/tmp/r", "--shapes", "4096x4096"]
    assert rows.default_command(argv) == "python benchmarks/layer_speed.py --tokens 1 16 --shapes 4096x4096"
    assert rows.default_command(["benchmarks/a.py", "--results-dir=/tmp/r", "--name", "two words"]) == \
        "python benchmarks/a.py --name 'two words'"


def test_parse_date_is_utc():
    assert rows.parse_date("2026-11-30") < rows.parse_date("2026-11-30T00:00:01Z")
    assert rows.parse_date("2026-11-30T01:00:00+01:00") == rows.parse_date("2026-11-30T00:00:00Z")
