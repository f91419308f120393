"""The decode GEMV kernels stream their factors with 16-byte vector loads when compiled for Hopper.

A GEMV at decode is a memory stream: with 2-byte scalar loads instead of 16-byte vector loads a
kernel issues eight times the load instructions and falls far short of the memory bandwidth, while
its results stay exactly right, so no correctness test notices. (The grouped kernel once read its
factors through addresses loaded from a table, which carry no alignment the compiler can see, and
ran q/k/v at 0.95x dense instead of 1.5x.) Each kernel is launched here as a decode call of a
Llama-2-7B-shaped layer would launch it (bf16, T = 1), its arguments specialized as triton's JIT
specializes them (16-byte-aligned pointers, integers equal to 1 or divisible by 16), compiled for
sm_90 in a subprocess without the interpreter, and the vector loads in its PTX counted: each thread
must read its share of a factor tile in 16-byte loads.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blastfx.kernels import gemv
from blastfx.structures.blast.layout import BlastShape

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_compile_for_hopper as hopper  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
THREADS = 4 * 32                                # num_warps of the default config


class _Recorder:
    """Stands in for a kernel: keeps the arguments of every ``kernel[grid](...)`` launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _spec(kernel, args, kwargs, module: str) -> dict:
    """Signature, constexprs and divisibility attributes of one launch of a kernel of ``module``, as
    the JIT specializes it."""
    fn = getattr(kernel, "fn", kernel)
    names = list(inspect.signature(fn).parameters)
    constexprs = set(hopper._constexpr_names(kernel))
    values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
    signature, consts, aligned = {}, {}, []
    for index, name in enumerate(names):
        value = values[name]
        if name in constexprs or value is None or (isinstance(value, int) and not isinstance(value, bool)
                                                    and value == 1):
            signature[name] = "constexpr"
            consts[index] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + hopper.TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                aligned.append(index)
        else:
            signature[name] = hopper._scalar_type(value)
            if isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0:
                aligned.append(index)
    return {"module": module, "kernel": fn.__name__, "signature": signature,
            "constexprs": {str(k): v for k, v in consts.items()}, "aligned": aligned}


_WORKER = r"""
import collections, importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
specs, target = json.load(open(sys.argv[1])), tuple(json.loads(sys.argv[2]))
out = []
for spec in specs:
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    source = ASTSource(kernel, spec["signature"], constexprs={(int(k),): v for k, v in spec["constexprs"].items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in spec["aligned"]})
    ptx = triton.compile(source, target=GPUTarget(*target), options=spec.get("options", {"num_warps": 4})).asm["ptx"]
    out.append(dict(collections.Counter(re.findall(r"ld\.global[\w.:]*|cp\.async\.c[ag]\.shared\.global|wgmma\.mma_async",
                                                   ptx))))
print(json.dumps(out))
"""


def _compile_loads(specs: list[dict], tmp_path) -> list[dict]:
    """For each spec, the count of each ``ld.global`` form in its sm_90 PTX, and of its asynchronous
    copies to shared memory (``cp.async.cg``: 16 bytes; ``cp.async.ca``: 4 or 8) and ``wgmma`` issues."""
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", _WORKER, str(path), json.dumps(hopper.TARGET)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load_bytes(form: str) -> int:
    """Bytes one thread reads with an ``ld.global`` form (``.v4.b32``: 16, ``.b64``: 8, ``.b8``: 1)."""
    lanes = re.search(r"\.v(\d)\.", form)
    bits = re.search(r"\.[bfsu](\d+)$", form)
    return (int(lanes.group(1)) if lanes else 1) * int(bits.group(1)) // 8 if bits else 0


def _vector_loads(loads: dict, nbytes: int = 16) -> int:
    """How many of the counted ``ld.global`` forms read exactly ``nbytes`` (``.v4.b32``, ``.v2.u64``, ...)."""
    return sum(count for form, count in loads.items() if _load_bytes(form) == nbytes)


def _layer(m, n, b=4, budget=0.5, rank=None):
    r = rank or int(budget * m * n / (m + n + b * b)) // 16 * 16
    shape = BlastShape.make(m, n, r, b)
    return (*(torch.zeros(*shape.factor_shapes[k], dtype=torch.bfloat16) for k in "USV"), None, shape)


def _coded(layer, fmt_name):
    """``layer`` (U, S, V, bias, shape) as a GEMV group member holding codes of ``fmt_name`` with scales."""
    from blastfx.structures.blast.quant import formats
    U, S, V, b, shape = layer
    fmt = formats.get(fmt_name)
    codes = [torch.zeros(*t.shape[:-1], fmt.stored_length(shape.rank), dtype=fmt.storage) for t in (U, V)]
    return (codes[0], S, codes[1], b, shape, torch.ones(shape.b_out, shape.p), torch.ones(shape.b_in, shape.rank))


def _gemv(x, member, cfg):
    """One-layer GEMV of ``member`` ((U, S, V, bias, shape), or with codes and their scales), recorded."""
    U, S, V, bias, shape, *scales = member
    codes = dict(zip(("U_scale", "V_scale"), scales))
    return gemv.blast_gemv(x, U, S, V, bias, shape, cfg, interpret=True, **codes)


@pytest.fixture(scope="module")
def toolchain():
    missing = hopper.missing_toolchain()
    if missing:
        pytest.skip(f"cannot compile for sm_90 on this machine: {missing}")


def _record(monkeypatch, name, call, module=gemv):
    kernel = getattr(module, name)
    recorder = _Recorder(kernel.kernel if isinstance(kernel, _Recorder) else kernel)
    monkeypatch.setattr(module, name, recorder)
    call()
    return [_spec(recorder.kernel, args, kwargs, module.__name__) for args, kwargs in recorder.launches]


@pytest.mark.parametrize("late", [False, True], ids=["bookkeeping-first", "late"])
def test_one_layer_grouped_int8_and_int4_kernels_stream_factors_in_16_byte_loads(toolchain, monkeypatch, tmp_path, late):
    cfg = {**gemv.DEFAULT, "mode": "two", "late": late}
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    o_proj = _layer(4096, 4096)
    qkv = [_layer(4096, 4096) for _ in range(3)]
    specs = _record(monkeypatch, "_gemv_decode_kernel", lambda: gemv.blast_gemv(x, *o_proj, cfg, interpret=True))
    specs += _record(monkeypatch, "_gemv_group_kernel", lambda: gemv.blast_gemv_group(x, qkv, cfg, interpret=True))
    int8 = _coded(o_proj, "int8")                               # int8 codes with their scales
    specs += _record(monkeypatch, "_gemv_decode_kernel", lambda: _gemv(x, int8, cfg))
    # packed int4 (two codes a byte) at a rank that is a multiple of 32: 16-byte rows of codes
    int4 = _coded(_layer(4096, 4096, rank=1024), "int4")
    for nibbles in ("interleave", "split"):
        specs += _record(monkeypatch, "_gemv_decode_kernel", lambda: _gemv(x, int4, {**cfg, "nibbles": nibbles}))
    assert [s["kernel"] for s in specs] == ["_gemv_decode_kernel"] * 2 + ["_gemv_group_kernel"] * 2 + \
        ["_gemv_decode_kernel"] * 6
    loads = _compile_loads(specs, tmp_path)
    for k, (spec, counts) in enumerate(zip(specs, loads)):
        stage = spec["constexprs"][str(list(spec["signature"]).index("STAGE"))]
        factor_bytes = 2 if k < 4 else 1 if k < 6 else 0.5
        # per thread, a stage-1 V tile (BQ x BR) or a stage-2 U tile (BP x BK), in 16-byte loads
        tile = cfg["BQ"] * cfg["BR"] if stage == 1 else cfg["BP"] * cfg["BK"]
        assert _vector_loads(counts) >= int(tile * factor_bytes) // (16 * THREADS), (k, spec["kernel"], stage, counts)
        if k >= 4:      # codes: no byte loads (only the codes are one byte wide)
            assert not counts.get("ld.global.b8") and not counts.get("ld.global.u8"), (k, stage, counts)


@pytest.mark.parametrize("codes,rank,width", [(None, 1016, 16), ("int8", 1024, 16), ("int4", 1024, 16),
                                              ("int8", 1016, 8)],
                         ids=["bf16-rank-1016", "int8-rank-1024", "int4-rank-1024", "int8-rank-1016"])
def test_grouped_kernel_reads_codes_and_its_input_in_vector_loads(toolchain, monkeypatch, tmp_path, codes, rank,
                                                                   width):
    """q/k/v of Llama-2-7B as one GEMV group: the group kernel finds each member's geometry in a
    table, whose values carry no divisibility the compiler can see, so it takes the alignment of the
    members' stored rows (AL_RC) and of their input columns (AL_Q) as constants. Rows of int8 or
    packed int4 codes then stream in 16-byte loads where the rank allows it (a rank that 16 divides
    for int8, 32 for int4; 1016 one-byte codes allow 8), and stage 1 reads its slice of x in vectors
    rather than one 2-byte load per column."""
    cfg = {**gemv.DEFAULT, "mode": "two"}
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    qkv = [_layer(4096, 4096, rank=rank) for _ in range(3)]
    if codes is not None:
        qkv = [_coded(layer, codes) for layer in qkv]
    specs = _record(monkeypatch, "_gemv_group_kernel", lambda: gemv.blast_gemv_group(x, qkv, cfg, interpret=True))
    assert [s["kernel"] for s in specs] == ["_gemv_group_kernel"] * 2
    factor_bytes = {None: 2, "int8": 1, "int4": 0.5}[codes]
    for spec, counts in zip(specs, _compile_loads(specs, tmp_path)):
        stage = spec["constexprs"][str(list(spec["signature"]).index("STAGE"))]
        tile = cfg["BQ"] * cfg["BR"] if stage == 1 else cfg["BP"] * cfg["BK"]
        assert _vector_loads(counts, width) >= int(tile * factor_bytes) // (width * THREADS), (stage, counts)
        assert not counts.get("ld.global.b8") and not counts.get("ld.global.u8"), (stage, counts)
        if stage == 1:
            assert not counts.get("ld.global.b16") and not counts.get("ld.global.u16"), counts


def test_a_rank_that_16_does_not_divide_keeps_vector_loads(toolchain, monkeypatch, tmp_path):
    """Ranks are multiples of 8 (``rank_multiple``), e.g. 1016 = 8 x 127, which the JIT does not mark
    as aligned (it marks multiples of 16): without the kernel's own alignment constants every mask
    and row start would look unaligned and each 16-byte load would become eight 2-byte loads (seen:
    a Llama-2-7B o_proj at rank 1016). bf16 keeps 16-byte loads, int8 and packed int4 codes keep
    vector loads (8 and 4 bytes: what 1016 and its 508 packed columns allow), none of them byte loads."""
    cfg = {**gemv.DEFAULT, "mode": "two"}
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    layer = _layer(4096, 4096, rank=1016)
    specs = _record(monkeypatch, "_gemv_decode_kernel", lambda: _gemv(x, layer, cfg))
    for fmt in ("int8", "int4"):
        specs += _record(monkeypatch, "_gemv_decode_kernel", lambda: _gemv(x, _coded(layer, fmt), cfg))
    loads = _compile_loads(specs, tmp_path)
    # (bytes a code or weight takes, the widest load its alignment allows): bf16 16, int8 8, int4 4
    widths = [(2, 16)] * 2 + [(1, 8)] * 2 + [(0.5, 4)] * 2
    for (spec, counts), (factor_bytes, width) in zip(zip(specs, loads), widths):
        stage = spec["constexprs"][str(list(spec["signature"]).index("STAGE"))]
        tile = cfg["BQ"] * cfg["BR"] if stage == 1 else cfg["BP"] * cfg["BK"]
        assert _vector_loads(counts, width) >= int(tile * factor_bytes) // (width * THREADS), (stage, width, counts)
        assert not counts.get("ld.global.b8") and not counts.get("ld.global.u8"), (stage, counts)


def test_ss1_decode_kernel_streams_its_shared_weight_in_16_byte_loads(toolchain, monkeypatch, tmp_path):
    """The SS1 CUDA-core form on a 4096x4096 layer at reduction 2 (half the parameters), T = 1."""
    from blastfx.structures.ss1 import SS1Layout, kernel as ss1_kernel
    monkeypatch.setattr(ss1_kernel, "INTERPRET", True)          # record the launch, run nothing
    L = SS1Layout(4096, 4096, 2)
    cfg = {"path": "gemv", "BN": 16, "KB": 256, "num_warps": 4}
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    w = torch.zeros(L.weight_shape, dtype=torch.bfloat16)
    specs = _record(monkeypatch, "_ss1_gemv_kernel", lambda: ss1_kernel.ss1_matmul_triton(
        x, w, L.shifts(), None, L.reduction, L.block_k, L.block_n, config=cfg), module=ss1_kernel)
    assert [s["kernel"] for s in specs] == ["_ss1_gemv_kernel"]
    (counts,) = _compile_loads(specs, tmp_path)
    assert _vector_loads(counts) >= cfg["BN"] * cfg["KB"] * 2 // (16 * THREADS), counts


def test_ss1_prefill_kernel_gathers_rotated_input_tiles_in_16_byte_loads(toolchain, monkeypatch, tmp_path):
    """The SS1 tensor-core form (4096x4096, reduction 2, T = 256) reads each rotated input tile in
    aligned 16-byte vectors when the op is told its shifts are multiples of 8 (a layout's ``vec``);
    told nothing (``vec=1``), the same gathers compile to 2-byte loads, which is what the promise buys."""
    from blastfx.structures.ss1 import SS1Layout, kernel as ss1_kernel
    monkeypatch.setattr(ss1_kernel, "INTERPRET", True)          # record the launch, run nothing
    L = SS1Layout(4096, 4096, 2)
    cfg = {"BM": 64, "BN": 64, "KB": 64, "num_warps": 4}
    x = torch.zeros(256, 4096, dtype=torch.bfloat16)
    w = torch.zeros(L.weight_shape, dtype=torch.bfloat16)
    specs = []
    for vec in (L.vec, 1):
        specs += _record(monkeypatch, "_ss1_kernel", lambda: ss1_kernel.ss1_matmul_triton(
            x, w, L.shifts(), None, L.reduction, L.block_k, L.block_n, config=cfg, vec=vec), module=ss1_kernel)
    aligned, scalar = _compile_loads(specs, tmp_path)
    x_tiles = L.reduction * cfg["BM"] * cfg["KB"] * 2 // (16 * THREADS)     # 16-byte loads per thread a step
    w_tile = cfg["BN"] * cfg["KB"] * 2 // (16 * THREADS)
    assert _vector_loads(aligned) >= x_tiles + w_tile, aligned
    assert not aligned.get("ld.global.b16") and not aligned.get("ld.global.u16"), aligned
    assert scalar.get("ld.global.b16", 0) + scalar.get("ld.global.u16", 0) > 0, scalar


@pytest.mark.parametrize("tile,options", [((128, 64, 64, False), {"num_warps": 8, "num_stages": 3}),
                                          ((256, 64, 64, True), {"num_warps": 4, "num_stages": 3})],
                         ids=["tokens-as-m", "swap-ab"])
def test_ss1_folded_gemm_feeds_the_tensor_cores_from_16_byte_async_copies(toolchain, monkeypatch, tmp_path, tile,
                                                                          options):
    """The fold path's GEMM (4096x4096, reduction 2, T = 1024, in either orientation) is a plain
    Hopper GEMM: both operand tiles, the selected folded copy and the rotated shared weight tile,
    arrive through 16-byte asynchronous copies (every thread's share of both tiles a stage, for
    each prefetched stage) and the products are ``wgmma``; no 2-byte load is left. The fold launch
    before it reads the rotated input tiles in 16-byte loads."""
    from blastfx.structures.ss1 import SS1Layout, kernel as ss1_kernel
    monkeypatch.setattr(ss1_kernel, "INTERPRET", True)          # record the launches, run nothing
    L = SS1Layout(4096, 4096, 2)
    cfg = {"path": "fold", "BM": tile[0], "BN": tile[1], "KB": tile[2], "swap_ab": tile[3]}
    x = torch.zeros(1024, 4096, dtype=torch.bfloat16)
    w = torch.zeros(L.weight_shape, dtype=torch.bfloat16)
    fold = _Recorder(ss1_kernel._ss1_fold_kernel)
    monkeypatch.setattr(ss1_kernel, "_ss1_fold_kernel", fold)
    (gemm_spec,) = _record(monkeypatch, "_ss1_folded_gemm_kernel", lambda: ss1_kernel.ss1_matmul_triton(
        x, w, L.shifts(), None, L.reduction, L.block_k, L.block_n, config=cfg, vec=L.vec), module=ss1_kernel)
    names = list(gemm_spec["signature"])
    gemm_spec["constexprs"][str(names.index("UPCAST"))] = False     # bf16 dots, as on a GPU
    gemm_spec["options"] = options
    fold_spec = _spec(fold.kernel, *fold.launches[0], ss1_kernel.__name__)
    gemm, folded = _compile_loads([gemm_spec, fold_spec], tmp_path)
    per_stage = (cfg["BM"] + cfg["BN"]) * cfg["KB"] * 2 // (16 * 32 * options["num_warps"])
    assert gemm.get("cp.async.cg.shared.global", 0) >= per_stage * (options["num_stages"] - 1), gemm
    assert gemm.get("wgmma.mma_async", 0) > 0, gemm
    assert not gemm.get("ld.global.b16") and not gemm.get("ld.global.u16"), gemm
    tile = ss1_kernel.FOLD_TILE
    assert _vector_loads(folded) >= L.reduction * tile["BT"] * tile["KB"] * 2 // (16 * THREADS), folded
    assert not folded.get("ld.global.b16") and not folded.get("ld.global.u16"), folded


def test_ss1_expansion_reads_and_writes_in_16_byte_vectors(toolchain, monkeypatch, tmp_path):
    """The SS1 expansion kernel (4096x4096, reduction 2, bf16) reads each rotated shared tile in
    16-byte loads: every thread's share of a (BN, KB) tile, no 2-byte loads."""
    from blastfx.structures.ss1 import SS1Layout, kernel as ss1_kernel
    monkeypatch.setattr(ss1_kernel, "INTERPRET", True)          # record the launch, run nothing
    L = SS1Layout(4096, 4096, 2)
    w = torch.zeros(L.weight_shape, dtype=torch.bfloat16)
    specs = _record(monkeypatch, "_ss1_expand_kernel", lambda: ss1_kernel.expand_triton(
        w, L.shifts(), L.in_features, L.reduction, L.block_k, L.block_n, L.vec), module=ss1_kernel)
    (counts,) = _compile_loads(specs, tmp_path)
    assert _vector_loads(counts) >= 16 * 256 * 2 // (16 * THREADS), counts
    assert not counts.get("ld.global.b16") and not counts.get("ld.global.u16"), counts


@pytest.mark.parametrize("ranks", [(1488, 1488, 1488), (1016, 1488, 1008)], ids=["llama2-mlp", "ranks-of-8"])
def test_mlp_chain_middle_kernel_streams_gate_up_and_down_rows_in_16_byte_loads(toolchain, monkeypatch, tmp_path,
                                                                               ranks):
    """The middle kernel of the MLP chain on Llama-2-7B's MLP (11008 x 4096, b = 4): every step reads
    BPM rows of U_gate, U_up and V_down, each a whole rank long, in 16-byte loads, also at ranks
    that only 8 divides."""
    from blastfx.kernels import mlp_chain
    cfg = {**mlp_chain.DEFAULT, "mode": "two"}
    x = torch.zeros(1, 4096, dtype=torch.bfloat16)
    gate, up = _layer(11008, 4096, rank=ranks[0]), _layer(11008, 4096, rank=ranks[1])
    down = _layer(4096, 11008, rank=ranks[2])
    monkeypatch.setattr(mlp_chain.gemv, "blast_gemv", lambda *a, **k: None)        # stage 3 is the one-layer kernel's
    monkeypatch.setattr(mlp_chain.gemv, "_gemv_group_kernel", _Recorder(gemv._gemv_group_kernel))
    specs = _record(monkeypatch, "_mlp_mid_kernel",
                    lambda: mlp_chain.blast_mlp_chain_gemv(x, gate, up, down, cfg, interpret=True), module=mlp_chain)
    assert [s["kernel"] for s in specs] == ["_mlp_mid_kernel"]
    (counts,) = _compile_loads(specs, tmp_path)
    padded = sum(1 << (r - 1).bit_length() for r in ranks)           # each row held at its padded length
    assert _vector_loads(counts) >= cfg["BPM"] * padded * 2 // (16 * THREADS), counts
    assert not counts.get("ld.global.b16") and not counts.get("ld.global.u16"), counts
