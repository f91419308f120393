"""The decode and folded-GEMM kernels have tiles that fit in registers when compiled for Hopper.

A tile too large for the register file compiles and runs correctly: ptxas spills what does not fit
to per-thread stack memory, so no correctness test notices, but each spilled value is a store and a
load through L1 on every loop step, and a thread at the 255-register limit halves the programs an
SM keeps in flight. For a decode GEMV, whose speed is the weight bytes in flight per SM, that is
time lost on every token. Compiled for sm_90 (the launches :mod:`test_compile_for_hopper` records,
as the launchers make them on a Hopper GPU), the register use and stack of each kernel are read
from its cubin with ``cuobjdump -res-usage``:

* each launch mode of the one-layer and grouped decode GEMV (two launches, programmatic dependent
  launch, one persistent launch) and each of its stages, reading float factors or int8 codes, has
  at least one tile among the autotuner's candidates that spills nothing, so the autotuner always has one to pick (wider
  tiles may spill; whether that costs more than it gains is the GPU's to measure);
* the fused prefill kernels (x·V with the mix, then w·Uᵀ) have a spill-free tile, in bf16 and fp16
  and for each block count recorded, for float factors and for each code format (int8, float8,
  packed int4): the mix's b_out sums of a (tokens, rank)
  tile, a thread's share of them, are what overflows the wider tiles;
* the MLP chain's middle kernel and the SS1 folded GEMM spill in none of their bf16/fp16 tiles.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_compile_for_hopper as hopper  # noqa: E402

GEMV = ("_gemv_decode_kernel", "_gemv_group_kernel")
FUSED = ("_xv_mix_kernel", "_wu_kernel")
NO_SPILL = ("_mlp_mid_kernel", "_ss1_folded_gemm_kernel")


def _value(launch, name):
    """A constexpr's or other plain value of the launch (None for an argument the kernel lacks)."""
    return dict(dict(launch.values).get(name, ())).get("value")


def _pointer(launch, name):
    return dict(dict(launch.values)[name]).get("pointer")


def _half_precision(launch) -> bool:
    return any(dict(desc).get("pointer") in ("*bf16", "*fp16") for _, desc in launch.values)


def _selected(launch) -> bool:
    if launch.kernel in GEMV:       # float and int8 factors at one token, as Llama-shaped layers run them
        return _value(launch, "BT") == 1 and _value(launch, "QUANT") in (0, 8) and _pointer(launch, "x_ptr") == "*bf16"
    if launch.kernel in FUSED:      # the prefill tiles (the decode splits use 16-token tiles)
        return _value(launch, "BT") >= 32 and _half_precision(launch)
    return launch.kernel in NO_SPILL and _half_precision(launch)


@pytest.fixture(scope="module")
def usage(tmp_path_factory, sm90_results):
    """{launch id: (launch, {"registers", "stack"})} for the launches this file checks."""
    missing = hopper.missing_toolchain() or (None if hopper.cuobjdump_path() else
                                             "triton's nvidia backend ships no cuobjdump beside its ptxas")
    if missing:
        pytest.skip(f"cannot read sm_90 register use on this machine: {missing}")
    wanted = {i: launch for i, launch in hopper.launches().items() if _selected(launch)}
    results = hopper.compile_launches(list(wanted), tmp_path_factory.mktemp("registers"), sm90_results)
    errors = {i: r["error"] for i, r in results.items() if r["error"]}
    assert not errors, errors
    return {i: (wanted[i], results[i]) for i in wanted}


def _mode(launch) -> str:
    if _value(launch, "STAGE") == 3:
        return "persistent"
    return "pdl" if _value(launch, "PDL") else "two"


def test_every_decode_launch_mode_and_stage_has_a_tile_that_does_not_spill(usage):
    stacks = defaultdict(list)
    for i, (launch, used) in usage.items():
        if launch.kernel in GEMV:
            factor = _pointer(launch, "v_ptr" if launch.kernel == "_gemv_decode_kernel" else "anchor_ptr")
            if factor not in ("*bf16", "*i8"):      # float8 codes share int8's tile code; one tile is compiled
                continue
            key = (launch.kernel, factor, _mode(launch), _value(launch, "STAGE"))
            stacks[key].append((used["stack"], used["registers"], i))
    modes = {(kernel, factor, mode) for kernel, factor, mode, _ in stacks}
    assert {(k, f, m) for k in GEMV for f in ("*bf16", "*i8") for m in ("two", "pdl", "persistent")} <= modes, \
        sorted(modes)
    for key, found in sorted(stacks.items()):
        assert min(stack for stack, _, _ in found) == 0, (key, sorted(found)[:4])


def test_fused_prefill_kernels_have_a_tile_that_does_not_spill_for_every_factor_format(usage):
    stacks = defaultdict(list)
    for i, (launch, used) in usage.items():
        if launch.kernel in FUSED:
            factor = "v_ptr" if launch.kernel == "_xv_mix_kernel" else "u_ptr"
            key = (launch.kernel, _value(launch, "B_OUT"), _pointer(launch, factor),
                   _pointer(launch, "y_ptr" if factor == "u_ptr" else "x_ptr"))
            stacks[key].append((used["stack"], used["registers"], i))
    formats = {k[2] for k in stacks}
    assert {"*bf16", "*i8", "*u8", "*fp8e4nv"} <= formats, sorted(formats)
    for key, found in sorted(stacks.items()):
        assert min(stack for stack, _, _ in found) == 0, (key, sorted(found)[:4])


@pytest.mark.parametrize("kernel", NO_SPILL)
def test_kernel_spills_in_none_of_its_tiles(usage, kernel):
    found = [(used["stack"], used["registers"], i) for i, (launch, used) in usage.items() if launch.kernel == kernel]
    assert found, f"no bf16/fp16 launch of {kernel} was recorded"
    spilled = [row for row in found if row[0]]
    assert not spilled, spilled
