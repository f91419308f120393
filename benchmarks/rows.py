"""Benchmark results as rows: one CSV per benchmark in ``benchmarks/results/``, one row per measurement.

    from rows import record, measurements
    record("layer_speed", measurements("4096x4096 b=4 T=1", {"out": 4096, "in": 4096, "b": 4, "T": 1},
                                       [("blastfx vs dense", 1.04, "x"), ("dense time", 0.0161, "ms")]))

Each row carries what reproduces and dates it: the commit (``+dirty`` when tracked files differ from
it), the device, the torch / triton / transformers versions, the UTC date and the command line.
``benchmarks/report.py`` turns the files into ``RESULTS.md`` (the latest row per case and metric);
older rows stay in the files, so a number's history is one ``git log -p`` away.

A file is rewritten whole under a lock on its folder (a temporary file, then ``os.replace``): an
interrupted or failing write leaves the previous file as it was, and two benchmarks writing at once
cannot lose each other's rows.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import numbers
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("benchmark", "case", "config", "metric", "value", "unit", "commit", "device", "torch", "triton",
           "transformers", "date", "command")
REQUIRED = ("case", "config", "metric", "value", "unit")            # what every row must say
PROVENANCE = ("commit", "device", "torch", "triton", "transformers", "date", "command")   # filled in when absent
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def record(benchmark: str, rows: list[dict], *, command: str | None = None,
           directory: str | os.PathLike | None = None) -> Path:
    """Append ``rows`` to ``<directory>/<benchmark>.csv`` (default ``benchmarks/results``), creating it
    with its header if absent; returns the file's path.

    Each row needs ``case`` (a short label, e.g. ``"4096x4096 b=4 T=1"``), ``config`` (a mapping of
    the case's parameters, stored as compact JSON), ``metric``, ``value`` (a number, or a short label
    such as the chosen kernel path) and ``unit`` (``""`` for a plain count or fraction). A row may
    also give any provenance column (commit, device, versions, date, command) to record a
    measurement made elsewhere; the others are filled in from this process. Every row is checked
    before the file is touched: a bad one raises ``ValueError`` naming the key and nothing is written.
    """
    if not isinstance(benchmark, str) or not _NAME.match(benchmark):
        raise ValueError(f"benchmark={benchmark!r}: use lower-case letters, digits and '_' (it names the file)")
    if isinstance(rows, Mapping) or not isinstance(rows, Iterable):
        raise ValueError(f"rows must be a list of dicts, got {type(rows).__name__}")
    rows = list(rows)
    defaults = None
    checked = []
    for k, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{k}] must be a dict, got {type(row).__name__}")
        for key in REQUIRED:
            if key not in row:
                raise ValueError(f"rows[{k}] has no {key!r} (each row needs {', '.join(REQUIRED)})")
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"rows[{k}] has unknown key(s) {sorted(unknown)} (columns: {', '.join(COLUMNS)})")
        if "benchmark" in row and row["benchmark"] != benchmark:
            raise ValueError(f"rows[{k}]['benchmark']={row['benchmark']!r} but recording into {benchmark!r}")
        if defaults is None and any(key not in row for key in PROVENANCE):
            defaults = provenance(command)
        out = {"benchmark": benchmark}
        out["case"] = _text(row["case"], k, "case", empty=False)
        out["config"] = _config(row["config"], k)
        out["metric"] = _text(row["metric"], k, "metric", empty=False)
        out["value"] = _value(row["value"], k)
        out["unit"] = _text(row["unit"], k, "unit")
        for key in PROVENANCE:
            out[key] = _text(row[key], k, key) if key in row else defaults[key]
        parse_date(out["date"], f"rows[{k}]['date']")
        checked.append(out)
    path = Path(directory if directory is not None else RESULTS_DIR) / f"{benchmark}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        if old:
            header = next(csv.reader(io.StringIO(old)), None)
            if tuple(header or ()) != COLUMNS:
                raise ValueError(f"{path}: its header {header} is not {list(COLUMNS)}; move it aside")
            if not old.endswith("\n"):
                old += "\n"
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        if not old:
            writer.writeheader()
        writer.writerows(checked)
        _replace(path, old + buf.getvalue())
    return path


def measurements(case: str, config: Mapping, metrics: Iterable[tuple[str, object, str]]) -> list[dict]:
    """Rows of one case: ``metrics`` is ``(metric, value, unit)`` triples; a ``None`` value (not
    measured) is left out."""
    return [{"case": case, "config": config, "metric": m, "value": v, "unit": u} for m, v, u in metrics
            if v is not None]


def read(path: str | os.PathLike) -> list[dict]:
    """The rows of one results file, in file order (as written: oldest first)."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: its header {reader.fieldnames} is not {list(COLUMNS)}")
        return list(reader)


def parse_date(text: str, what: str = "date") -> datetime:
    """A row's date as an aware UTC datetime (a bare date is midnight UTC)."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={text!r} is not an ISO date") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def add_arguments(parser) -> None:
    """The options every benchmark script shares: where its rows go."""
    parser.add_argument("--results-dir", default=str(RESULTS_DIR),
                        help="folder of the results CSVs (default: benchmarks/results)")


def provenance(command: str | None = None) -> dict:
    """This process's provenance columns."""
    return {"commit": git_commit(), "device": device_name(), "torch": _version("torch"),
            "triton": _version("triton"), "transformers": _version("transformers"),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command if command is not None else default_command()}


def default_command(argv: list[str] | None = None) -> str:
    """``python benchmarks/<script> <args>`` for this process, without ``--results-dir`` (where the
    rows went does not change what they measure)."""
    argv = list(sys.argv if argv is None else argv)
    args, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
        elif a == "--results-dir":
            skip = True
        elif not a.startswith("--results-dir="):
            args.append(a)
    return shlex.join(["python", f"benchmarks/{Path(argv[0]).name}", *args])


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """Short hash of HEAD, ``+dirty`` when tracked files differ from it; ``"unknown"`` outside git."""
    try:
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=30, check=True,
                                cwd=REPO_ROOT)
        head = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


@functools.lru_cache(maxsize=None)
def device_name() -> str:
    """The GPU's name when torch sees one, else the CPU model and the threads torch uses."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    threads = torch.get_num_threads() if torch is not None else os.cpu_count()
    return f"{model} ({threads} threads)"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _text(value, k, key, empty=True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"rows[{k}][{key!r}]={value!r} must be a string")
    if not empty and not value.strip():
        raise ValueError(f"rows[{k}][{key!r}] is empty")
    return value


def _config(value, k) -> str:
    if isinstance(value, str):                  # already JSON (e.g. copied from another results file)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"rows[{k}]['config']={value!r} is not JSON") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"rows[{k}]['config']={value!r} must be a dict of the case's parameters")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"rows[{k}]['config'] is not JSON-serializable: {e}") from None


def _value(value, k) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"rows[{k}]['value']={value!r} must be a number or a short label")
    if isinstance(value, str):
        if not value.strip() or "\n" in value:
            raise ValueError(f"rows[{k}]['value']={value!r}: a label must be one non-empty line")
        return value
    if isinstance(value, numbers.Integral):
        return str(int(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"rows[{k}]['value']={value!r} must be a number or a short label") from None
    if not math.isfinite(number):
        raise ValueError(f"rows[{k}]['value']={value!r} is not finite")
    return repr(number)


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``folder`` (POSIX flock; no lock where there is none)."""
    try:
        import fcntl
    except ImportError:                         # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                            # closing releases the lock


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` all or nothing: a temporary file beside it, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
