"""benchmarks/common.py's torchao baselines: int8 weight-only quantizes as torchao says, and torchao's
recommended Inductor settings reach torchao's compiles only, never the dense baseline's."""
import argparse
import sys
from pathlib import Path

import pytest
import torch
from torch._inductor import config as inductor_config

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import llama_e2e  # noqa: E402


@pytest.fixture
def plain_inductor():
    """Inductor as a process without torchao has it (coordinate-descent tuning off), restored after."""
    with inductor_config.patch(coordinate_descent_tuning=False, coordinate_descent_check_all_directions=False):
        yield


def test_int8_baseline_is_per_row_rounding_and_leaves_inductor_alone(plain_inductor):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 96, bias=False, dtype=torch.bfloat16)
    w = layer.weight.detach().double()
    common.torchao_weight_only(layer, "int8")
    assert inductor_config.coordinate_descent_tuning is False          # quantize_ set nothing process-wide
    assert layer.weight.qdata.dtype == torch.int8 and layer.weight.qdata.shape == (96, 256)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x).double()
    exact = x.double() @ w.T
    # per-row symmetric codes: each weight within half a step (max |row| / 127) of its value, plus
    # bf16's rounding of the scale, the product and the output
    step = w.abs().amax(1) / 127
    bound = (step / 2 + w.abs().amax(1) * 2**-8) * x.double().abs().sum(1, keepdim=True) + exact.abs() * 2**-7
    assert ((y - exact).abs() <= bound).all()
    assert (y - exact).abs().max() > 0                                  # it is quantized, not the bf16 layer


def test_compile_settings_hold_inside_the_block_only(plain_inductor):
    with common.torchao_compile_settings():
        assert inductor_config.coordinate_descent_tuning is True
        assert inductor_config.coordinate_descent_check_all_directions is True
    assert inductor_config.coordinate_descent_tuning is False
    with pytest.raises(RuntimeError, match="inside"):
        with common.torchao_compile_settings():
            raise RuntimeError("inside")
    assert inductor_config.coordinate_descent_tuning is False
    assert inductor_config.coordinate_descent_check_all_directions is False


def test_only_torchao_models_are_timed_under_its_settings(plain_inductor, tmp_path):
    seen = {}

    def decode(model, backend, options):
        seen[model] = inductor_config.coordinate_descent_tuning
        return 100.0

    models = {n: (n, "blast" if n.startswith("blastfx") else "inductor", None)
              for n in ("dense", "torchao int8", "blastfx int4", "torchao int4")}
    args = argparse.Namespace(model="llama2-7b", results_dir=str(tmp_path))
    llama_e2e.time_rows(args, models, [("decode", "decode", "tok/s", decode, True)], {})
    assert seen == {"dense": False, "torchao int8": True, "blastfx int4": False, "torchao int4": True}
