"""The examples as tests: training from scratch with init="random" BLAST layers must learn."""
import importlib.util
from pathlib import Path

import torch

import blastfx


def load_example(name):
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vit_from_scratch_on_digits_learns_like_dense_of_equal_macs():
    vit = load_example("train_vit_digits")
    blast, dense = vit.build_pair(budget=0.5)
    assert any(isinstance(m, blastfx.BlastLinear) for m in blast.modules())
    assert abs(vit.linear_macs(blast) - vit.linear_macs(dense)) < 0.15 * vit.linear_macs(blast)
    data = vit.digits()
    acc_blast = vit.train(blast, data, epochs=12)
    acc_dense = vit.train(dense, data, epochs=12)
    assert acc_blast > 0.85                      # chance is 0.10
    assert acc_blast > acc_dense - 0.08
