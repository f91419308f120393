"""benchmarks/compress_speed.py under torchrun: the ranks split the fit, rank 0 alone records, and the
compressed model is the one a single process makes."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
ARGS = ["--model", "tiny", "--recipes", "loss", "--layers", "2", "--calib-tokens", "256", "--seq", "64"]


def run(prefix, results):
    # on the CPU (gloo) whatever GPUs the machine has: the test is about ranks, not devices
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([*prefix, str(BENCH / "compress_speed.py"), *ARGS, "--results-dir", str(results)],
                   check=True, env=env, cwd=BENCH, capture_output=True, timeout=600)
    with open(results / "compress_speed.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_ranks_record_once_and_match_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = run(torchrun, tmp_path / "two")
    one = run([sys.executable], tmp_path / "one")
    assert {r["case"] for r in two} == {"tiny 2 blocks loss resident 2 ranks"}
    assert {json.loads(r["config"])["ranks"] for r in two} == {2}
    assert len({r["metric"] for r in two}) == len(two)                  # one row per metric: rank 0 only
    assert {json.loads(r["config"])["ranks"] for r in one} == {1}
    e1, e2 = (float(next(r["value"] for r in rows if r["metric"] == "hidden-state rel error")) for rows in (one, two))
    assert abs(e1 - e2) <= 1e-3 * e1                                    # the same fit, split over two ranks
