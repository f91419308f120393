"""benchmarks/run.py: the registry covers the scripts, --list, --deadline keeps recorded rows."""
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import rows  # noqa: E402
import run  # noqa: E402

HELPERS = {"rows.py", "run.py", "report.py", "common.py"}       # modules, not benchmarks


def test_registry_names_every_benchmark_script():
    scripts = {p.name for p in BENCH.glob("*.py")} - HELPERS
    assert {b.script for b in run.REGISTRY.values()} == scripts
    for name, bench in run.REGISTRY.items():
        assert bench.gpu in ("yes", "optional", "no"), name
        assert bench.title and bench.measures and bench.duration and bench.reading, name


def test_list_shows_name_gpu_duration_and_what_it_measures():
    out = subprocess.run([sys.executable, str(BENCH / "run.py"), "--list"], capture_output=True, text=True,
                         check=True).stdout
    for name, bench in run.REGISTRY.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert bench.gpu in line.split() and bench.duration in line and bench.measures in line


@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown benchmark 'nope'"),
    (["--deadline", "0", "factorize_speed"], "--deadline must be a positive"),
    ([], "name a benchmark"),
])
def test_bad_arguments_are_named(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("sigint", ["default", "ignored"])   # ignored: run.py in a background job, nohup
def test_deadline_stops_the_script_and_keeps_its_rows(tmp_path, sigint):
    marker = tmp_path / "interrupted"
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(BENCH)!r})
        from rows import record
        record("slow", [dict(case="first", config={{}}, metric="m", value=1, unit="", commit="x", device="d",
                             torch="", triton="", transformers="", date="2026-12-01", command="c")],
               directory={str(tmp_path)!r})
        try:
            time.sleep(120)
        except KeyboardInterrupt:
            open({str(marker)!r}, "w").close()     # the benchmark's own cleanups get to run
            raise
        """))
    registry = {"slow": run.Benchmark(str(script), "Slow", "sleeps", "no", "2 min", "sleeps")}
    t0 = time.perf_counter()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
    try:
        rc = run.main(["--deadline", "0.15", "slow"], registry=registry)   # 9 s: room to import on a busy machine
    finally:
        signal.signal(signal.SIGINT, before)
    assert rc == 124
    assert time.perf_counter() - t0 < 30
    assert [r["case"] for r in rows.read(tmp_path / "slow.csv")] == ["first"]
    assert marker.exists()


def test_arguments_after_the_name_go_to_the_script(tmp_path):
    script = tmp_path / "echo.py"
    out = tmp_path / "argv.txt"
    script.write_text(f"import sys; open({str(out)!r}, 'w').write(' '.join(sys.argv[1:]))\n")
    registry = {"echo": run.Benchmark(str(script), "Echo", "echoes", "no", "1 s", "echoes")}
    assert run.main(["echo", "--deadline", "9", "--tokens", "1"], registry=registry) == 0
    assert out.read_text() == "--deadline 9 --tokens 1"


def test_a_real_benchmark_records_through_run_py(tmp_path):
    """factorize_speed on a tiny matrix, end to end: run.py -> script -> rows in --results-dir."""
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "factorize_speed", "--shapes", "48x64",
                           "--blocks", "4", "--rank", "8", "--ref-iters", "5", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = rows.read(tmp_path / "factorize_speed.csv")
    assert {r["case"] for r in got} == {"48x64 b=4 r=8 ref=5"}
    by_metric = {r["metric"]: r for r in got}
    assert by_metric["precgd iterations"]["value"] == "5"
    assert by_metric["als time"]["unit"] == "s"
    # ALS stops once it reaches the reference's error: the benchmark's premise
    assert float(by_metric["als rel error"]["value"]) <= float(by_metric["precgd rel error"]["value"])
    assert by_metric["als rel error"]["command"] == (
        "python benchmarks/factorize_speed.py --shapes 48x64 --blocks 4 --rank 8 --ref-iters 5")
