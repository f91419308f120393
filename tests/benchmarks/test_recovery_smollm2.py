"""benchmarks/recovery_smollm2.py: ``--factor-dtype`` evaluates a rounded copy of the distilled model
and counts its bytes as quality_quantized.py does, leaving the distilled model as it was."""
import copy
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import models  # noqa: E402
import recovery_smollm2  # noqa: E402
import blastfx  # noqa: E402
from blastfx.llm.evaluate import perplexity  # noqa: E402
from blastfx.structures.blast.quant import quantize_model  # noqa: E402


def test_quantized_after_rounds_a_copy_and_counts_its_bytes():
    dense = models.tiny_llama()
    model = copy.deepcopy(dense)
    blastfx.compress(model, 0.5, config=blastfx.BlastConfig(init="random", progress=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, 100, (2, 16))
    base = perplexity(dense, windows)
    rows = {name: value for name, value, _ in recovery_smollm2.quantized_after(model, dense, windows, base, ["int8"])}
    assert set(rows) == {"decoder bytes vs bf16 dense", "perplexity after KD, int8", "x dense after KD, int8",
                         "decoder bytes vs bf16 dense, int8"}
    want = perplexity(quantize_model(copy.deepcopy(model), "int8"), windows)
    assert rows["perplexity after KD, int8"] == round(want, 2)
    assert rows["x dense after KD, int8"] == round(want / base, 3)
    # codes: one byte an entry where the float factors take four (plus scales): well under half
    assert rows["decoder bytes vs bf16 dense, int8"] < 0.5 * rows["decoder bytes vs bf16 dense"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert recovery_smollm2.quantized_after(model, dense, windows, base, []) == []


def test_quantized_after_rounds_with_the_calibration_batches_when_given():
    dense = models.tiny_llama()
    model = copy.deepcopy(dense)
    blastfx.compress(model, 0.5, config=blastfx.BlastConfig(init="random", progress=False))
    windows, calib = torch.randint(0, 100, (2, 16)), [torch.randint(0, 100, (2, 16))]
    base = perplexity(dense, windows)
    rows = dict((name, value) for name, value, _ in
                recovery_smollm2.quantized_after(model, dense, windows, base, ["int8"], calibration=calib))
    want = perplexity(quantize_model(copy.deepcopy(model), "int8", calibration=calib), windows)
    assert rows["perplexity after KD, int8"] == round(want, 2)
