"""Triton forward of ``blastfx::blast_matmul``: kernels, the paths built from them, and their configs.

Three stages, ``z_j = x_j V_j`` (xv), ``w_i = sum_j s_ij * z_j`` (mix), ``y_i = w_i U_i^T`` (wu); no
path ever forms the (b_out, b_in, T, r) product. A *path* is one way of running the three stages:

* ``fused``: ``_xv_mix_kernel`` computes every z_j for a (T-tile, r-tile) on tensor cores and mixes it
  at once into a (b_out, BT, BR) register accumulator, so z never leaves registers; ``_wu_kernel``
  then does w U^T with bias, cast, padding trim and the (T, m) layout in its epilogue. For decode the
  x·V reduction is split over block-columns *and* chunks of q (``J_PER_PROG``, ``Q_CHUNK``) so the
  grid fills every SM while U, V, S are each streamed once; partial w are added atomically in fp32.
* ``bmm_mix_bmm``: cuBLAS, the ``_mix_kernel`` (one memory pass), cuBLAS writing straight into the
  (T, m) layout through a strided ``out=``.
* ``fused_bmm``: ``_xv_mix_kernel`` then cuBLAS for w U^T.
* ``decode`` (T <= 64): the two stages of :mod:`.decode` -- one persistent launch with a grid barrier,
  or two launches where the second is a programmatic dependent that streams U while the first drains
  -- so a decode step pays about one kernel's ramp-up and tail per layer instead of three.
* ``gemv`` (T <= 4): :mod:`.gemv`, both stages as CUDA-core GEMV streams (no tensor-core padding of
  T to 16), the s-mix folded into stage 1 with float atomics; left out under
  ``torch.use_deterministic_algorithms`` like the other paths with float atomics.

Which path (and tile config) is fastest depends on the shape and the token count; :mod:`.autotune`
measures the candidates of :func:`candidates` once per (shape, dtype, token bucket), rotating through
clones of the weights so they stream from memory as in a model, and caches the winner. Every path is checked against ``blastfx.structures.blast.ops.blast_matmul_reference`` in tests.

Quantized factors (``blastfx::blast_matmul_quantized``, :func:`blast_matmul_quantized_triton`): int8,
float8 and packed int4 codes are read by the kernels themselves: at T <= 4 the ``gemv`` kernels,
beyond them the ``fused`` kernels and at T = 5-16 also the one-launch ``decode`` kernel; these two
unpack tiles of codes and convert them to the activation dtype in registers (exact for int8 and
int4 codes, and for float8 into bf16 or fp16) before the tensor-core dot; V's per-(j, rank) scale
multiplies z before the mix, U's per-row scale each output after its reduction over r. Past the
GEMV the autotuner also times ``dequantize``: a float copy of U and V made per call in one pass
(:mod:`.dequantize`) and the float paths on it. At prefill sizes the work is compute-bound and the
float paths' tiles outrun the fused kernels by more than the copy costs; the codes then save
memory, not time.

Under ``TRITON_INTERPRET=1`` (CPU tests) operands are upcast to fp32 before ``tl.dot``: the
interpreter's bf16 dot is wrong. fp32 inputs use IEEE dots (a GPU would otherwise use TF32).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..structures.blast.layout import BlastShape
from ..structures.blast.ops import _in_blocks
from ..structures.blast.quant import formats as factor_formats
from . import autotune
from . import decode as decode_kernels
from . import dequantize as dequantize_kernels
from . import gemv as gemv_kernels
from .codes import CODE_DTYPES, CODE_NAMES, _load_factor_tile

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _xv_mix_kernel(x_ptr, v_ptr, s_ptr, w_ptr, T, N, Q, R, B_IN, Q_SPLIT, Q_CHUNK,
                   sxt, sxn, svj, svq, svr, ssi, ssj, ssr, swi, swt, swr, vs_ptr, svsj, svsr, RC,
                   B_OUT: tl.constexpr, B_OUT_P2: tl.constexpr, J_PER_PROG: tl.constexpr,
                   BT: tl.constexpr, BR: tl.constexpr, BQ: tl.constexpr,
                   UPCAST: tl.constexpr, ATOMIC: tl.constexpr, QUANT: tl.constexpr):
    """w_i (+)= sum_j s_ij (x_j V_j) for one (T-tile, r-tile) over J_PER_PROG block-columns and one
    q-chunk. QUANT (8 or 4): V holds codes (RC stored columns), converted to x's dtype in registers
    (exact for int8 and int4 codes) and their per-(j, rank) scale applied to z before the mix."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_j = tl.program_id(2) // Q_SPLIT
    q0 = (tl.program_id(2) % Q_SPLIT) * Q_CHUNK
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_r = pid_r * BR + tl.arange(0, BR)
    offs_i = tl.arange(0, B_OUT_P2)
    acc = tl.zeros((B_OUT_P2, BT, BR), dtype=tl.float32)
    for jj in range(J_PER_PROG):
        j = pid_j * J_PER_PROG + jj
        q_lim = tl.where(j < B_IN, tl.minimum(Q, q0 + Q_CHUNK), 0)   # a j past the last block reads nothing
        z = tl.zeros((BT, BR), dtype=tl.float32)
        for c0 in range(q0, q0 + Q_CHUNK, BQ):
            offs_c = c0 + tl.arange(0, BQ)
            col = j * Q + offs_c
            xm = (offs_t[:, None] < T) & (offs_c[None, :] < q_lim) & (col[None, :] < N)
            xt = tl.load(x_ptr + offs_t[:, None] * sxt + col[None, :] * sxn, mask=xm, other=0.0)
            vt = _load_factor_tile(v_ptr + j * svj, offs_c, offs_c < q_lim, svq, svr, pid_r * BR, R, RC,
                                   BQ, BR, QUANT)
            if UPCAST:
                z = tl.dot(xt.to(tl.float32), vt.to(tl.float32), z, input_precision="ieee")
            else:
                z = tl.dot(xt, vt.to(xt.dtype), z)
        if QUANT != 0:
            z *= tl.load(vs_ptr + j * svsj + offs_r * svsr, mask=offs_r < tl.where(j < B_IN, R, 0), other=0.0)[None, :]
        sm = (offs_i[:, None] < B_OUT) & (offs_r[None, :] < tl.where(j < B_IN, R, 0))
        s = tl.load(s_ptr + offs_i[:, None] * ssi + j * ssj + offs_r[None, :] * ssr, mask=sm, other=0.0)
        acc += s.to(tl.float32)[:, None, :] * z[None, :, :]
    w_ptrs = w_ptr + offs_i[:, None, None] * swi + offs_t[None, :, None] * swt + offs_r[None, None, :] * swr
    wm = (offs_i[:, None, None] < B_OUT) & (offs_t[None, :, None] < T) & (offs_r[None, None, :] < R)
    if ATOMIC:
        tl.atomic_add(w_ptrs, acc, mask=wm)
    else:
        tl.store(w_ptrs, acc.to(w_ptr.dtype.element_ty), mask=wm)


@triton.jit
def _wu_kernel(w_ptr, u_ptr, b_ptr, y_ptr, T, M, P, R,
               swj, swt, swr, sui, sup, sur, syt, sym, us_ptr, susi, susp, RC,
               HAS_BIAS: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
               BR: tl.constexpr, UPCAST: tl.constexpr, QUANT: tl.constexpr):
    """y_i = w_i U_i^T with bias, cast, padding trim and the (T, m) layout in the epilogue. QUANT (8
    or 4): U holds codes, read as (p, r) tiles (int4 unpacked along r), converted to y's dtype in
    registers and transposed for the dot; each output's per-row scale applied after the reduction."""
    pid_t = tl.program_id(0)
    pid_p = tl.program_id(1)
    i = tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_p = pid_p * BP + tl.arange(0, BP)
    acc = tl.zeros((BT, BP), dtype=tl.float32)
    for k0 in range(0, R, BR):
        offs_k = k0 + tl.arange(0, BR)
        am = (offs_t[:, None] < T) & (offs_k[None, :] < R)
        wt = tl.load(w_ptr + i * swj + offs_t[:, None] * swt + offs_k[None, :] * swr, mask=am, other=0.0)
        if QUANT != 0:
            ut = tl.trans(_load_factor_tile(u_ptr + i * sui, offs_p, offs_p < P, sup, sur, k0, R, RC, BP, BR,
                                            QUANT).to(tl.float32 if UPCAST else y_ptr.dtype.element_ty))
        else:
            ut = tl.load(u_ptr + i * sui + offs_p[None, :] * sup + offs_k[:, None] * sur,
                         mask=(offs_p[None, :] < P) & (offs_k[:, None] < R), other=0.0)
        if UPCAST:
            acc = tl.dot(wt.to(tl.float32), ut.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(wt.to(ut.dtype), ut, acc)
    if QUANT != 0:
        acc *= tl.load(us_ptr + i * susi + offs_p * susp, mask=offs_p < P, other=0.0)[None, :]
    rows = i * P + offs_p
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=(offs_p < P) & (rows < M), other=0.0).to(tl.float32)[None, :]
    ym = (offs_t[:, None] < T) & (offs_p[None, :] < P) & (rows[None, :] < M)
    tl.store(y_ptr + offs_t[:, None] * syt + rows[None, :] * sym, acc.to(y_ptr.dtype.element_ty), mask=ym)


@triton.jit
def _mix_kernel(z_ptr, s_ptr, w_ptr, T, R, B_OUT, B_IN, szj, szt, szr, ssi, ssj, ssr, swi, swt, swr,
                BI: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr):
    """w_i = sum_j s_ij * z_j for BI block-rows at once: one read of z, one write of w."""
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_r = tl.program_id(1) * BR + tl.arange(0, BR)
    offs_i = tl.program_id(2) * BI + tl.arange(0, BI)
    acc = tl.zeros((BI, BT, BR), dtype=tl.float32)
    zm = (offs_t[:, None] < T) & (offs_r[None, :] < R)
    sm = (offs_i[:, None] < B_OUT) & (offs_r[None, :] < R)
    for j in range(B_IN):
        zt = tl.load(z_ptr + j * szj + offs_t[:, None] * szt + offs_r[None, :] * szr, mask=zm, other=0.0)
        s = tl.load(s_ptr + offs_i[:, None] * ssi + j * ssj + offs_r[None, :] * ssr, mask=sm, other=0.0)
        acc += s.to(tl.float32)[:, None, :] * zt.to(tl.float32)[None, :, :]
    wm = (offs_i[:, None, None] < B_OUT) & zm[None, :, :]
    tl.store(w_ptr + offs_i[:, None, None] * swi + offs_t[None, :, None] * swt + offs_r[None, None, :] * swr,
             acc.to(w_ptr.dtype.element_ty), mask=wm)


# ---------------------------------------------------------------------------------------------
# Stages


def _upcast(x) -> bool:
    return INTERPRET or x.dtype == torch.float32


def _final_config(cfg: dict, overrides: dict | None) -> dict:
    """The chosen config with the caller's overrides; under the interpreter, tiles of at most 16
    (small tiles keep the CPU interpreter fast)."""
    cfg = {**cfg, **(overrides or {})}
    if INTERPRET:
        cfg.update({k: min(cfg.get(k, 16), 16) for k in ("BQ", "BRU", "BP", "BT2", "BT", "BR", "BK")})
    return cfg


def _launch_opts(cfg) -> dict:
    return {} if INTERPRET else {"num_warps": cfg.get("warps", 4), "num_stages": cfg.get("stages", 3)}


def _quant_bits(codes) -> int:
    """What the fused kernels' QUANT reads: 0 for float factors, else the bits of one code (int8,
    packed int4 or float8 codes, the formats whose codes :func:`.codes._load_factor_tile` reads)."""
    if codes.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return 0
    if codes.dtype not in CODE_DTYPES:
        raise ValueError(f"the fused kernels read float factors or codes of {CODE_NAMES}, got {codes.dtype}")
    return factor_formats.of_storage(codes.dtype).bits


def xv_mix(x2, V, S, shape: BlastShape, cfg: dict, V_scale=None) -> torch.Tensor:
    """Stage 1+2 fused: w (b_out, T, r); fp32 when the reduction is split (atomic adds). With
    ``V_scale`` (b_in, r), V holds int8 or packed int4 codes."""
    T, n = x2.shape
    jpp = min(cfg.get("J_PER_PROG", shape.b_in), shape.b_in)
    q_chunk = cfg.get("Q_CHUNK") or shape.q
    q_chunk = triton.cdiv(min(q_chunk, shape.q), cfg["BQ"]) * cfg["BQ"]
    q_split = triton.cdiv(shape.q, q_chunk)
    j_split = triton.cdiv(shape.b_in, jpp)
    atomic = j_split * q_split > 1
    w = (torch.zeros if atomic else torch.empty)(
        shape.b_out, T, shape.rank, device=x2.device, dtype=torch.float32 if atomic else x2.dtype)
    grid = (triton.cdiv(T, cfg["BT"]), triton.cdiv(shape.rank, cfg["BR"]), j_split * q_split)
    vs = V_scale if V_scale is not None else S                  # not read for float factors
    _xv_mix_kernel[grid](x2, V, S, w, T, n, shape.q, shape.rank, shape.b_in, q_split, q_chunk,
                         x2.stride(0), x2.stride(1), *V.stride(), *S.stride(), *w.stride(),
                         vs, vs.stride(0), vs.stride(-1), V.shape[-1],
                         B_OUT=shape.b_out, B_OUT_P2=triton.next_power_of_2(shape.b_out), J_PER_PROG=jpp,
                         BT=cfg["BT"], BR=cfg["BR"], BQ=cfg["BQ"], UPCAST=_upcast(x2), ATOMIC=atomic,
                         QUANT=_quant_bits(V), **_launch_opts(cfg))
    return w


def xv_bmm(x2, V, shape: BlastShape) -> torch.Tensor:
    """Stage 1 on cuBLAS: x read in place as (b_in, T, q) (row stride n), z (b_in, T, r)."""
    return torch.bmm(_in_blocks(x2, shape.b_in, shape.q), V)


def mix(z, S, shape: BlastShape, cfg: dict) -> torch.Tensor:
    b_in, T, R = z.shape
    w = torch.empty(shape.b_out, T, R, device=z.device, dtype=z.dtype)
    bi = min(cfg.get("BI", 4), triton.next_power_of_2(shape.b_out))
    grid = (triton.cdiv(T, cfg.get("BTM", 32)), triton.cdiv(R, cfg.get("BRM", 64)), triton.cdiv(shape.b_out, bi))
    _mix_kernel[grid](z, S, w, T, R, shape.b_out, b_in, *z.stride(), *S.stride(), *w.stride(),
                      BI=bi, BT=cfg.get("BTM", 32), BR=cfg.get("BRM", 64), **_launch_opts({"warps": 4}))
    return w


def wu(w, U, bias, shape: BlastShape, cfg: dict, out_dtype, U_scale=None) -> torch.Tensor:
    """Stage 3: y (T, out_features) with bias and cast fused. With ``U_scale`` (b_out, p), U holds
    int8 or packed int4 codes."""
    T = w.shape[1]
    y = torch.empty(T, shape.out_features, device=w.device, dtype=out_dtype)
    grid = (triton.cdiv(T, cfg["BT2"]), triton.cdiv(shape.p, cfg["BP"]), shape.b_out)
    us = U_scale if U_scale is not None else y                  # not read for float factors
    _wu_kernel[grid](w, U, bias if bias is not None else y, y, T, shape.out_features, shape.p, shape.rank,
                     *w.stride(), *U.stride(), y.stride(0), y.stride(1), us, us.stride(0), us.stride(-1),
                     U.shape[-1], HAS_BIAS=bias is not None, BT=cfg["BT2"], BP=cfg["BP"], BR=cfg["BRU"],
                     UPCAST=_upcast(U) or _upcast(y), QUANT=_quant_bits(U),
                     **_launch_opts({"warps": cfg.get("warps2", 4), "stages": cfg.get("stages2", 3)}))
    return y


def wu_bmm(w, U, bias, shape: BlastShape, out_dtype) -> torch.Tensor:
    """Stage 3 on cuBLAS, written straight into the (T, m) layout (strided ``out=``)."""
    T = w.shape[1]
    y = torch.empty(T, shape.m_pad, device=w.device, dtype=out_dtype)
    torch.bmm(w.to(U.dtype), U.transpose(1, 2), out=y.view(T, shape.b_out, shape.p).transpose(0, 1))
    if shape.m_pad != shape.out_features:
        y = y[:, : shape.out_features].contiguous()
    if bias is not None:
        y += bias
    return y


# ---------------------------------------------------------------------------------------------
# Paths and their candidate configs


def _fused(x2, U, S, V, bias, shape, cfg):
    return wu(xv_mix(x2, V, S, shape, cfg), U, bias, shape, cfg, x2.dtype)


def _fused_bmm(x2, U, S, V, bias, shape, cfg):
    return wu_bmm(xv_mix(x2, V, S, shape, cfg), U, bias, shape, x2.dtype)


def _bmm_mix_bmm(x2, U, S, V, bias, shape, cfg):
    return wu_bmm(mix(xv_bmm(x2, V, shape), S, shape, cfg), U, bias, shape, x2.dtype)


def _decode(x2, U, S, V, bias, shape, cfg):
    return decode_kernels.blast_decode(x2, U, S, V, bias, shape, cfg, interpret=INTERPRET)


def _gemv(x2, U, S, V, bias, shape, cfg):
    return gemv_kernels.blast_gemv(x2, U, S, V, bias, shape, cfg, interpret=INTERPRET)


PATHS = {"fused": _fused, "fused_bmm": _fused_bmm, "bmm_mix_bmm": _bmm_mix_bmm, "decode": _decode, "gemv": _gemv}
ATOMIC_PATHS = ("fused", "fused_bmm", "gemv")      # float atomics: the summation order varies between runs
DECODE_MAX_T = autotune.DECODE_MAX_T


@functools.lru_cache(maxsize=None)
def num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def decode_config(shape: BlastShape, device, waves: int = 4) -> dict:
    """Split x·V over block-columns and q-chunks until ~``waves`` programs per SM; small U tiles."""
    sms = num_sms(device)
    BR = 64 if shape.b_out <= 4 else 32
    BQ = 64
    r_tiles = triton.cdiv(shape.rank, BR)
    want = waves * sms
    q_split = max(1, min(triton.cdiv(shape.q, BQ), triton.cdiv(want, r_tiles * shape.b_in)))
    q_chunk = triton.cdiv(triton.cdiv(shape.q, q_split), BQ) * BQ
    BP = 64
    while BP > 16 and triton.cdiv(shape.p, BP) * shape.b_out < 2 * sms:
        BP //= 2
    return dict(BT=16, BR=BR, BQ=BQ, J_PER_PROG=1, Q_CHUNK=q_chunk, BT2=16, BP=BP, BRU=64, warps=4, stages=3)


def prefill_configs(shape: BlastShape) -> tuple[list[dict], list[dict]]:
    """(configs of the x·V+mix kernel, configs of the w·U^T kernel) for large T."""
    small_acc = triton.next_power_of_2(shape.b_out) <= 4
    # the x·V kernel holds b_out (BT, BR) fp32 sums of the mix a thread's share: with 64-128 token
    # tiles on 4 warps per 64 tokens they take half the registers and, compiled for sm_90, spill
    # 400-640 bytes a thread; the last two tiles hold half as many a thread and spill nothing
    # (tests/kernels/test_register_spills.py)
    fused = ([dict(BT=64, BR=64, BQ=64, warps=4), dict(BT=128, BR=64, BQ=64, warps=8),
              dict(BT=64, BR=64, BQ=64, warps=8), dict(BT=32, BR=64, BQ=64, warps=4)] if small_acc
             else [dict(BT=32, BR=32, BQ=64, warps=4), dict(BT=64, BR=32, BQ=32, warps=8)])
    wu_cfgs = [dict(BT2=128, BP=128, BRU=64, warps2=8, stages2=3), dict(BT2=64, BP=128, BRU=64, warps2=4, stages2=4),
               dict(BT2=128, BP=256, BRU=32, warps2=8, stages2=3), dict(BT2=64, BP=128, BRU=64, warps2=8, stages2=3)]
    return fused, wu_cfgs


def candidates(T: int, shape: BlastShape, device) -> list[tuple[str, dict]]:
    """(path, config) pairs worth timing for this token count. The first is the untimed default (used
    when a CUDA graph is captured before the shape was tuned): ``bmm_mix_bmm``, the most frequent
    winner on an H100 (``benchmarks/layer_speed.py``). Under ``torch.use_deterministic_algorithms``
    only paths without float atomics run, so repeated calls give identical bits. Cached: it is on
    every call's path."""
    return _candidates(T <= DECODE_MAX_T, T <= gemv_kernels.MAX_T, torch.are_deterministic_algorithms_enabled(),
                       shape, device)


@functools.lru_cache(maxsize=None)
def _candidates(decode: bool, few_tokens: bool, deterministic: bool, shape: BlastShape,
                device) -> list[tuple[str, dict]]:
    cands = _all_candidates(decode, few_tokens, shape, device)
    return [(p, c) for p, c in cands if not (deterministic and p in ATOMIC_PATHS)]


def _all_candidates(decode: bool, few_tokens: bool, shape: BlastShape, device) -> list[tuple[str, dict]]:
    # b_out > 4: also mix all block-rows in one program, so z is read once rather than b_out/4 times
    wide_mix = [{"BI": 16, "BTM": 16, "BRM": 32}, {"BI": 8, "BTM": 32, "BRM": 32}] if shape.b_out > 4 else []
    if decode:
        gemv = [("gemv", c) for c in gemv_kernels.candidates(device)] if few_tokens else []
        return ([("bmm_mix_bmm", {})] + gemv + [("decode", c) for c in decode_kernels.candidates(device)]
                + [("fused", decode_config(shape, device, 4)),
                   ("fused", decode_config(shape, device, 8)), ("fused_bmm", decode_config(shape, device, 4))]
                + [("bmm_mix_bmm", c) for c in wide_mix])
    fused, wu_cfgs = prefill_configs(shape)
    out = [("bmm_mix_bmm", {})] + [("bmm_mix_bmm", c) for c in wide_mix]
    out += [("fused", {**f, **wu_cfgs[0]}) for f in fused]
    out += [("fused_bmm", f) for f in fused]
    return out


def tuning_key(T: int, shape: BlastShape, dtype, has_bias: bool, device) -> tuple:
    """What an autotuned choice is shared by (benchmarks use it to read the choice back)."""
    return (autotune.token_bucket(T), shape, dtype, has_bias, str(device))


def run_path(x2, U, S, V, bias, shape, path: str, cfg: dict):
    return PATHS[path](x2, U, S, V, bias, shape, cfg)


def blast_matmul_triton(x, U, S, V, bias=None, out_features=None, path: str | None = None,
                        config: dict | None = None, shape: BlastShape | None = None):
    """The fast forward; same contract as :func:`blastfx.structures.blast.ops.blast_matmul_reference`.

    ``path``/``config`` force a path and override config keys (tests, benchmarks); by default the
    autotuner picks the fastest candidate for this (shape, dtype, token bucket). ``shape``: the
    factors' layout when the caller already derived it (the op's CUDA kernel, once per call).
    """
    shape = shape or BlastShape.from_factors(U, S, V, out_features=out_features)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    T = x2.shape[0]
    cands = candidates(T, shape, x.device)
    if path is None:
        key = tuning_key(T, shape, x.dtype, bias is not None, x.device)
        copies = autotune.WeightCopies((U, S, V), x.device)
        path, cfg = autotune.choose(key, cands, lambda p, c, k: run_path(x2, *copies[k], bias, shape, p, c),
                                    copies=copies.count)
    else:
        cfg = next((c for p, c in cands if p == path), None)
        if cfg is None:             # a path not timed at this size: its generic tiles
            fused, wu_cfgs = prefill_configs(shape)
            cfg = decode_config(shape, x.device) if T <= DECODE_MAX_T else {**fused[0], **wu_cfgs[0]}
    y = run_path(x2, U, S, V, bias, shape, path, _final_config(cfg, config))
    return y.reshape(*lead, shape.out_features)


QUANTIZED_PATHS = ("gemv", "decode", "fused", "dequantize")     # what blast_matmul_quantized_triton runs


def quantized_candidates(T: int, U, shape: BlastShape, device) -> list[tuple[str, dict]]:
    """(path, config) pairs the quantized forward times for T tokens; the first is the untimed
    default. "gemv" (T <= 4, float atomics allowed), "decode" (T <= 16: one launch, or two chained,
    no float atomics) and "fused" read the codes in registers; "dequantize" makes a float copy of U
    and V per call and runs the float paths (their own tuning), which at prefill sizes beats "fused":
    there cuBLAS's tiles outrun the fused kernels by more than the copy costs. Under
    ``torch.use_deterministic_algorithms`` "fused" times only configs that split no reduction.
    Cached per token bucket, whose bounds include the paths' (4 and 16): it is on every call's path."""
    return _quantized_candidates(U.dtype, autotune.token_bucket(T), torch.are_deterministic_algorithms_enabled(),
                                 shape, device)


@functools.lru_cache(maxsize=None)
def _quantized_candidates(codes, T: int, deterministic: bool, shape: BlastShape, device) -> list[tuple[str, dict]]:
    if codes not in CODE_DTYPES:
        return [("dequantize", {})]
    if T <= gemv_kernels.MAX_T and not deterministic:
        int4 = codes == factor_formats.get("int4").storage
        return [("gemv", c) for c in gemv_kernels.candidates(device, int4=int4)]
    fused = [("fused", c) for c in quantized_fused_candidates(T, shape, device)]
    if T > DECODE_MAX_T:
        return [("dequantize", {})] + fused
    return fused + [("decode", c) for c in decode_kernels.candidates(device)] + [("dequantize", {})]


def quantized_path(T: int, U, shape: BlastShape, dtype, has_bias: bool, device) -> str:
    """The path quantized factors take for T tokens of ``dtype``: the autotuner's choice where it
    was made for this (shape, dtypes, bias, token bucket), else the untimed default."""
    key = quantized_tuning_key(T, U, shape, dtype, has_bias, device)
    return autotune.report().get(key, quantized_candidates(T, U, shape, device)[0][0])


def quantized_tuning_key(T: int, U, shape: BlastShape, dtype, has_bias: bool, device) -> tuple:
    """What an autotuned choice for quantized factors is shared by."""
    return ("quantized", str(U.dtype)) + tuning_key(T, shape, dtype, has_bias, device)


def quantized_fused_candidates(T: int, shape: BlastShape, device) -> list[dict]:
    """Configs of the fused path over codes: the decode splits (atomic adds into fp32 w) at decode
    sizes, the prefill tiles (one program per (T, r) tile sums every block-column: no atomics)
    otherwise and under ``torch.use_deterministic_algorithms``."""
    fused, wu_cfgs = prefill_configs(shape)
    whole = [{**f, **wu_cfgs[0]} for f in fused] + [{**fused[0], **w} for w in wu_cfgs[1:]]
    spill_free = {**fused[-1], **wu_cfgs[-1]}       # both tiles fit in registers with codes too
    if spill_free not in whole:
        whole.append(spill_free)
    if T > DECODE_MAX_T or torch.are_deterministic_algorithms_enabled():
        return whole
    return [decode_config(shape, device, 4), decode_config(shape, device, 8)] + whole[:1]


def blast_matmul_quantized_triton(x, U, U_scale, S, V, V_scale, bias=None, out_features=None, path: str | None = None,
                                  config: dict | None = None, shape: BlastShape | None = None):
    """The fast forward of quantized factors; same contract as
    :func:`blastfx.structures.blast.quant.ops.blast_matmul_quantized_reference`. ``path``: "gemv",
    "decode", "fused" or "dequantize" (default: the autotuner's pick of :func:`quantized_candidates`);
    ``config`` overrides config keys."""
    from ..structures.blast.quant.ops import quantized_shape

    shape = shape or quantized_shape(U, S, V, out_features)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    T = x2.shape[0]

    def run(path, cfg, factors):
        Uk, suk, Sk, Vk, svk = factors
        if path == "gemv":
            return gemv_kernels.blast_gemv(x2, Uk, Sk, Vk, bias, shape, cfg, interpret=INTERPRET, U_scale=suk,
                                           V_scale=svk)
        if path == "decode":
            return decode_kernels.blast_decode(x2, Uk, Sk, Vk, bias, shape, cfg, interpret=INTERPRET, U_scale=suk,
                                               V_scale=svk)
        if path == "fused":
            return wu(xv_mix(x2, Vk, Sk, shape, cfg, V_scale=svk), Uk, bias, shape, cfg, x2.dtype, U_scale=suk)
        Ud, Vd = dequantize_kernels.dequantized(Uk, suk, Vk, svk, x.dtype)
        return blast_matmul_triton(x2, Ud, Sk, Vd, bias, out_features, shape=shape)

    cands = quantized_candidates(T, U, shape, x2.device)
    if path is None:
        key = quantized_tuning_key(T, U, shape, x.dtype, bias is not None, x2.device)
        copies = autotune.WeightCopies((U, U_scale, S, V, V_scale), x.device)
        path, cfg = autotune.choose(key, cands, lambda p, c, k: run(p, c, copies[k]), copies=copies.count)
    elif path in QUANTIZED_PATHS:
        cfg = next((c for p, c in cands if p == path), None)
        if cfg is None:             # a path not timed at this size: its first config at this size
            cfg = quantized_fused_candidates(T, shape, x2.device)[0] if path == "fused" else {}
    else:
        raise ValueError(f"path must be one of {QUANTIZED_PATHS} for quantized factors, got {path!r}")
    return run(path, _final_config(cfg, config), (U, U_scale, S, V, V_scale)).reshape(*lead, shape.out_features)
