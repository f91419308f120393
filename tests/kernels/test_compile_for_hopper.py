"""Every Triton kernel blastfx launches, compiled for Hopper (sm_90) in each variant its launchers pass.

Why: on a CPU the kernels run under ``TRITON_INTERPRET=1``, as Python, so an error that only Triton's
compiler raises (a function whose returns have different types, a layout it cannot build, inline PTX
the target rejects) would first show on a GPU. Triton's nvidia backend compiles for a target named
explicitly, with no device present: source -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin (ptxas).

The variants are *recorded*, not listed: each launcher (the forward paths, the quantized GEMV, the
GEMV group, the backward middle, SS1) is called over its own config table with meta tensors of
realistic shapes, as on a Hopper GPU (programmatic dependent launch available, no interpreter),
while every kernel is replaced by a recorder that keeps its arguments and launch options instead of
running. So a new config, constexpr or launch mode is covered without touching this file, and only
what the code launches is compiled. Identical launches are compiled once; each distinct one is a test.

Coverage: every config of every table at the base points, the first config of each launch mode
elsewhere (a launch mode selects code, the rest of a config only tile sizes). Every (path, config)
the forward's autotuner times, in bf16 with a bias, at T = 1 (the GEMV, decode, fused and bmm paths)
and T = 256 (prefill) on an attention-sized layer (4 x 4 blocks); the GEMV reading int8 codes, and
the GEMV group, over all their configs at T = 1, and reading packed int4 or float8 codes (which
share the tile code) over one config per code variant; the GEMV group and the MLP chain reading each
code format, one config per code variant; the block tail over every config at T = 1, and reading each code format one config per mode; the
block seam over every config at T = 1; the block ops' residual add and RMSNorm at three widths and
dtypes; the fused kernels reading each code format
over the configs the quantized forward times at T = 8 and 256, in bf16 and fp16, the one-launch decode
kernel reading each code format at T = 8, one config per launch mode, and the one-pass
copy of each code format into bf16 and fp16. One config per mode: T = 2, 4, 16
(the GEMV's BT = 2, 4), fp16 and fp32 (IEEE dots) at T = 1 and 256, no bias, an MLP-sized layer of
16 x 4 blocks, the GEMV's stages launched alone. The backward middle for every pair of block counts
the CUDA op runs it for (bf16; one pair in fp16 and fp32); SS1 over its decode and prefill
candidates (bf16) and its decode ones in fp32.

Kernels decorated under the interpreter are Python functions that Triton cannot compile, so the
compiles run in worker processes (this file run as a script) that import blastfx without
``TRITON_INTERPRET``. Without triton's nvidia backend or its ptxas the tests skip, naming what is
missing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TARGET = ("cuda", 90, 32)           # Hopper: sm_90, warps of 32 threads
KERNEL_MODULES = ("blastfx.kernels.codes", "blastfx.kernels.gemv", "blastfx.kernels.decode", "blastfx.kernels.forward",
                  "blastfx.kernels.dequantize", "blastfx.kernels.backward", "blastfx.kernels.mlp_chain",
                  "blastfx.kernels.block_tail", "blastfx.kernels.add_norm", "blastfx.structures.ss1.kernel")
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv"}
WORKER_TIMEOUT_S = 1800


# ---------------------------------------------------------------------------------------------
# Kernel signatures (used by the compile workers)


def _scalar_type(value) -> str:
    """Triton's type of a scalar argument that is not a constexpr (ints as the JIT types them)."""
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"a scalar kernel argument must be a bool, int or float, got {value!r}")


def kernel_signature(kernel, values: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource`` from a launch's arguments by
    name: ``{"pointer": "*bf16"}`` for a tensor, ``{"value": v}`` for a constexpr (or None),
    ``{"scalar": "i32"}`` for another scalar, with ``"divisible": True`` where 16 divides it, and
    ``{"one": True}`` for an integer equal to 1. Which arguments are constexprs comes from the kernel
    (its ``tl.constexpr`` annotations). As the JIT specializes a launch: pointers are marked 16-byte
    aligned (torch's allocations are), integers that 16 divides are marked so, and an integer equal
    to 1 becomes the constant 1 (a unit stride: the compiler then sees contiguous, vectorizable
    accesses). Compiled without that, a kernel is not the code a GPU runs: its loads narrower, its
    register use different."""
    names = [p.name for p in kernel.params]
    missing, unknown = set(names) - set(values), set(values) - set(names)
    if missing or unknown:
        raise ValueError(f"{kernel.__name__}: the launch misses arguments {sorted(missing)} and gives unknown "
                         f"ones {sorted(unknown)}")
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr or value.get("value", 0) is None:     # triton treats None as a constexpr
            if "value" not in value:
                raise TypeError(f"{kernel.__name__}: constexpr {param.name} was given {value}, not a value")
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value["value"]
        elif value.get("one"):
            signature[param.name] = "constexpr"
            constexprs[(index,)] = 1
        elif "pointer" in value:
            signature[param.name] = value["pointer"]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif "scalar" in value:
            signature[param.name] = value["scalar"]
            if value.get("divisible"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{kernel.__name__}: {param.name} is no constexpr but was given the value "
                            f"{value['value']!r}")
    return signature, constexprs, attrs


def _describe_error(error: BaseException) -> str:
    """The error and the errors it was raised from, innermost last (a compile error's cause says why)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append("".join(traceback.format_exception_only(type(error), error)).strip())
        error = error.__cause__ or error.__context__
    return "\n-- raised from --\n".join(parts)


def compile_launch(spec: dict):
    """Compile one recorded launch for :data:`TARGET` and return the compiled kernel; raises whatever
    the compiler raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{spec['module']}.{spec['kernel']} is a {type(kernel).__name__}, not a JITFunction: "
                        "the compile worker must import blastfx without TRITON_INTERPRET")
    signature, constexprs, attrs = kernel_signature(kernel, spec["values"])
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget(*TARGET), options=spec["options"])


def resource_usage(cubin: bytes, path: Path) -> dict:
    """Registers a thread and stack bytes a thread (where ptxas puts spilled registers) of a cubin's
    one kernel, as ``cuobjdump -res-usage`` reads them from the binary (written to ``path``)."""
    path.write_bytes(cubin)
    done = subprocess.run([cuobjdump_path(), "-res-usage", str(path)], capture_output=True, text=True, timeout=120)
    found = re.search(r"REG:(\d+) STACK:(\d+)", done.stdout)
    if done.returncode or not found:
        raise RuntimeError(f"cuobjdump -res-usage gave no register count: {done.stdout[-500:]} {done.stderr[-500:]}")
    return {"registers": int(found[1]), "stack": int(found[2])}


def _work(specs_path: str, results_path: str) -> None:
    """Compile every launch of ``specs_path`` (JSON), one JSON line per launch into ``results_path``."""
    sys.path.insert(0, str(REPO))
    specs = json.loads(Path(specs_path).read_text())
    with open(results_path, "w") as out:
        for spec in specs:
            start = time.perf_counter()
            usage = {}
            try:
                kernel = compile_launch(spec)
                if spec.get("resources"):
                    usage = resource_usage(kernel.asm["cubin"], Path(results_path).with_suffix(".cubin"))
                error = None
            except Exception as e:              # reported by the test of this launch
                error = _describe_error(e)
            out.write(json.dumps({"id": spec["id"], "error": error, "seconds": time.perf_counter() - start, **usage})
                      + "\n")
            out.flush()


# ---------------------------------------------------------------------------------------------
# Recording the launches


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as recorded: its arguments by name (pointer dtypes, other values) and options."""
    module: str
    kernel: str
    values: tuple           # ((name, (("pointer", "*bf16"),), (("scalar", "i32"),) or (("value", v),)), ...)
    options: tuple          # ((name, value), ...): num_warps, num_stages, launch_pdl, ...
    constexprs: tuple       # names of the kernel's constexpr parameters, in order

    def spec(self, launch_id: str) -> dict:
        return {"id": launch_id, "module": self.module, "kernel": self.kernel,
                "values": {name: dict(desc) for name, desc in self.values}, "options": dict(self.options)}

    def label(self) -> str:
        """Kernel, constexprs, pointer dtypes in argument order (distinct ones) and options: a test id."""
        values = dict(self.values)
        const = ",".join(f"{n}={dict(values[n]).get('value')}" for n in self.constexprs)
        dtypes = []
        for name, desc in self.values:
            ptr = dict(desc).get("pointer")
            if ptr and ptr[1:] not in dtypes:
                dtypes.append(ptr[1:])
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.kernel}[{const}][{'/'.join(dtypes)}][{opts}]"


def _constexpr_names(kernel) -> tuple[str, ...]:
    """Names of the kernel's ``tl.constexpr`` parameters: from a JITFunction's params, or from the
    annotations of the function an interpreted kernel wraps (strings under postponed evaluation)."""
    if hasattr(kernel, "params"):
        return tuple(p.name for p in kernel.params if p.is_constexpr)
    params = inspect.signature(kernel.fn).parameters.values()
    return tuple(p.name for p in params if "constexpr" in str(p.annotation))


def _describe_value(kernel_name: str, name: str, value, constexpr: bool):
    """What the compile of a launch needs of one argument: a constexpr's value, a tensor's pointer
    type, another scalar's type and, for an integer, what the JIT specializes on (equal to 1,
    divisible by 16); so launches that differ only in sizes of the same divisibility compile once."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in TRITON_TYPES:
            raise TypeError(f"{kernel_name}: argument {name} is a {value.dtype} tensor, which has no triton type here")
        return (("pointer", "*" + TRITON_TYPES[value.dtype]),)
    if value is None or (constexpr and isinstance(value, (bool, int, float))):
        return (("value", value),)
    if isinstance(value, int) and not isinstance(value, bool):
        if value == 1:
            return (("one", True),)
        return (("scalar", _scalar_type(value)),) + ((("divisible", True),) if value % 16 == 0 else ())
    if isinstance(value, (bool, float)):
        return (("scalar", _scalar_type(value)),)
    raise TypeError(f"{kernel_name}: argument {name}={value!r} is neither a tensor nor a scalar")


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch, runs nothing."""

    def __init__(self, module: str, name: str, kernel, sink: list):
        self.module, self.name, self.kernel, self.sink = module, name, kernel, sink
        self.constexprs = _constexpr_names(kernel)

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        names = list(self.kernel.arg_names)
        if len(args) > len(names):
            raise TypeError(f"{self.name} takes {len(names)} arguments, the launch gives {len(args)}")
        values, options = dict(zip(names, args)), {}
        for key, value in kwargs.items():
            (values if key in names else options)[key] = value
        missing = [n for n in names if n not in values]
        if missing:
            raise TypeError(f"the launch of {self.name} misses arguments {missing}")
        described = tuple((n, _describe_value(self.name, n, values[n], n in self.constexprs)) for n in names)
        self.sink.append(Launch(self.module, self.name, described, tuple(sorted(options.items())), self.constexprs))


def _kernels_of(module) -> dict:
    """The Triton kernels (jitted or interpreted) a module defines itself, by name."""
    from triton.runtime.jit import JITFunction

    kinds = (JITFunction,)
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction
        kinds += (InterpretedFunction,)
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, kinds) and getattr(getattr(obj, "fn", None), "__module__", None) == module.__name__}


def _direct_launch(kernel, key, args, grid, device, what, interpret=False, **kwargs):
    """``launch_persistent`` without its occupancy check (that needs the device): the launch itself."""
    kernel[(grid,)](*args, **kwargs)


def _restore_caches_on_exit(stack: contextlib.ExitStack, modules) -> None:
    """The launchers keep per-device state in module-level dicts (counters, workspaces, group tables)
    and memoize per-device answers: what the recording put there (meta tensors, answers for a GPU
    that is not here) is dropped on exit, so the tests collected after this file see none of it."""
    for module in modules:
        for value in vars(module).values():
            if type(value) is dict:
                stack.callback(lambda d=value, saved=dict(value): (d.clear(), d.update(saved)))
            elif hasattr(value, "cache_clear") and getattr(value, "__module__", None) == module.__name__:
                stack.callback(value.cache_clear)


@contextlib.contextmanager
def recording(sink: list):
    """Within: every kernel of :data:`KERNEL_MODULES` records its launches into ``sink``; launchers
    behave as on a Hopper GPU without the interpreter (programmatic dependent launch available; one
    device, index 0, for caches keyed by it)."""
    modules = [importlib.import_module(m) for m in KERNEL_MODULES]
    with contextlib.ExitStack() as stack:
        _restore_caches_on_exit(stack, [*modules, importlib.import_module("blastfx.kernels.state")])
        for module in modules:
            for name, kernel in _kernels_of(module).items():
                stack.enter_context(mock.patch.object(module, name, _Recorder(module.__name__, name, kernel, sink)))
            for name, value in (("INTERPRET", False), ("pdl_supported", lambda device: True),
                                ("launch_persistent", _direct_launch), ("_index", lambda device: 0)):
                if hasattr(module, name):
                    stack.enter_context(mock.patch.object(module, name, value))
        yield


# ---------------------------------------------------------------------------------------------
# The launchers, over their config tables

META = torch.device("meta")


def _code_variant(cfg):
    """What of a config selects code rather than tile sizes: its launch mode, and for the GEMV where
    stage 1 does its bookkeeping (``late``), how int4 nibbles are reduced and whether U is preloaded;
    None without a mode."""
    return (cfg["mode"], cfg.get("late"), cfg.get("nibbles"), cfg.get("preload")) if "mode" in cfg else None


def _per_mode(configs, every: bool, mode=_code_variant) -> list:
    """``configs`` (every=True), or the first config of each code variant (launch mode and the like)
    and every config that has none: those select code, the rest of a config only tile sizes."""
    if every:
        return list(configs)
    out, seen = [], set()
    for k, cfg in enumerate(configs):
        key = mode(cfg)
        if key is None:
            key = ("config", k)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def _layer_shapes():
    """An attention projection (4 x 4 blocks) and an MLP up-projection (16 x 4 blocks, where the
    forward mixes more block-rows per program)."""
    from blastfx.structures.blast.layout import BlastShape

    return (BlastShape.make(2048, 2048, 512, 4), BlastShape.make(8192, 2048, 768, (16, 4)))


def _factors(shape, dtype, bias: bool):
    U = torch.empty(shape.b_out, shape.p, shape.rank, dtype=dtype, device=META)
    S = torch.empty(shape.b_out, shape.b_in, shape.rank, dtype=dtype, device=META)
    V = torch.empty(shape.b_in, shape.q, shape.rank, dtype=dtype, device=META)
    b = torch.empty(shape.out_features, dtype=dtype, device=META) if bias else None
    return U, S, V, b


def _forward_paths(T: int, shape, dtype, bias: bool = True, every: bool = True) -> None:
    """The (path, config) pairs the forward's autotuner times for T tokens (decode or prefill)."""
    from blastfx.kernels import forward, gemv

    x2 = torch.empty(T, shape.in_features, dtype=dtype, device=META)
    U, S, V, b = _factors(shape, dtype, bias)
    cands = forward._all_candidates(T <= forward.DECODE_MAX_T, T <= gemv.MAX_T, shape, META)
    for path, cfg in _per_mode(cands, every, lambda pc: (pc[0], _code_variant(pc[1])) if "mode" in pc[1] else None):
        forward.run_path(x2, U, S, V, b, shape, path, cfg)


def _coded_inputs(T: int, shape, dtype, code_dtype):
    """(x2, U codes, U_scale, S, V codes, V_scale, bias) as meta tensors: T tokens of ``dtype`` and
    factors quantized to the format stored as ``code_dtype``, S and bias in ``dtype``."""
    from blastfx.structures.blast.quant import formats

    fmt = formats.of_storage(code_dtype)
    U, S, V, b = _factors(shape, torch.float32, bias=True)
    (Uc, su), (Vc, sv) = formats.quantize_u(U, fmt), formats.quantize_v(V, fmt)
    x2 = torch.empty(T, shape.in_features, dtype=dtype, device=META)
    return x2, Uc, su, S.to(dtype), Vc, sv, b.to(dtype)


def _quantized_gemv(T: int, shape, dtype, code_dtype, every: bool = True) -> None:
    """The GEMV reading codes of the format stored as ``code_dtype``, over its configs."""
    from blastfx.kernels import gemv
    from blastfx.structures.blast.quant import formats

    x2, Uc, su, S, Vc, sv, b = _coded_inputs(T, shape, dtype, code_dtype)
    for cfg in _per_mode(gemv.candidates(META, int4=code_dtype == formats.get("int4").storage), every):
        gemv.blast_gemv(x2, Uc, S, Vc, b, shape, cfg, U_scale=su, V_scale=sv)


def _quantized_fused(T: int, shape, dtype, code_dtype) -> None:
    """The fused tensor-core kernels reading codes of the format stored as ``code_dtype``, over the
    configs the quantized forward times for T tokens."""
    from blastfx.kernels import forward

    x2, Uc, su, S, Vc, sv, b = _coded_inputs(T, shape, dtype, code_dtype)
    for cfg in forward.quantized_fused_candidates(T, shape, META):
        w = forward.xv_mix(x2, Vc, S, shape, cfg, V_scale=sv)
        forward.wu(w, Uc, b, shape, cfg, dtype, U_scale=su)


def _quantized_decode(T: int, shape, dtype, code_dtype) -> None:
    """The one-launch decode kernel reading codes of the format stored as ``code_dtype``, one config
    per launch mode of those the quantized forward times."""
    from blastfx.kernels import decode

    x2, Uc, su, S, Vc, sv, b = _coded_inputs(T, shape, dtype, code_dtype)
    for cfg in _per_mode(decode.candidates(META), every=False):
        decode.blast_decode(x2, Uc, S, Vc, b, shape, cfg, U_scale=su, V_scale=sv)


def _dequantize(shape, dtype, code_dtype) -> None:
    """The one-pass copy of U and V from codes of the format stored as ``code_dtype``."""
    from blastfx.kernels import dequantize
    from blastfx.structures.blast.quant import formats

    fmt = formats.of_storage(code_dtype)
    U, _, V, _ = _factors(shape, torch.float32, bias=False)
    (Uc, su), (Vc, sv) = formats.quantize_u(U, fmt), formats.quantize_v(V, fmt)
    dequantize.dequantized(Uc, su, Vc, sv, dtype)


def _gemv_single_stages(shape, dtype) -> None:
    """The GEMV's stages launched alone (``only_stage``, for profiles) in its two-launch modes."""
    from blastfx.kernels import gemv

    x2 = torch.empty(1, shape.in_features, dtype=dtype, device=META)
    U, S, V, b = _factors(shape, dtype, bias=True)
    for cfg in _per_mode(gemv.candidates(META), every=False):
        if cfg["mode"] != "persistent":
            for stage in (1, 2):
                gemv.blast_gemv(x2, U, S, V, b, shape, cfg, only_stage=stage)


def _members(shapes, dtype, code_dtype=None):
    """(U, S, V, bias, shape) per shape, only the first with a bias; with ``code_dtype`` U and V are
    codes of that storage and the scales follow: (U, S, V, bias, shape, U_scale, V_scale)."""
    from blastfx.structures.blast.quant import formats

    out = []
    for k, s in enumerate(shapes):
        U, S, V, b = _factors(s, dtype, bias=k == 0)
        if code_dtype is None:
            out.append((U, S, V, b, s))
        else:
            fmt = formats.of_storage(code_dtype)
            (Uc, su), (Vc, sv) = formats.quantize_u(U.float(), fmt), formats.quantize_v(V.float(), fmt)
            out.append((Uc, S, Vc, b, s, su, sv))
    return out


def _gemv_group(T: int, dtype, every: bool = True, code_dtype=None) -> None:
    """Attention's q/k/v projections (k and v narrower, only q with a bias) as one GEMV group, with
    float factors or codes of ``code_dtype``."""
    from blastfx.kernels import gemv
    from blastfx.structures.blast.layout import BlastShape
    from blastfx.structures.blast.quant import formats

    q, kv = BlastShape.make(2048, 2048, 512, 4), BlastShape.make(512, 2048, 128, 4)
    members = _members((q, kv, kv), dtype, code_dtype)
    x2 = torch.empty(T, 2048, dtype=dtype, device=META)
    for cfg in _per_mode(gemv.group_candidates(META, int4=code_dtype == formats.get("int4").storage), every):
        gemv.blast_gemv_group(x2, members, cfg)


def _mlp_chain(T: int, dtype, every: bool = True, code_dtype=None) -> None:
    """A gated MLP (gate and up of different ranks, gate with a bias) as one chain of three launches,
    with float factors or codes of ``code_dtype``."""
    from blastfx.kernels import mlp_chain
    from blastfx.structures.blast.layout import BlastShape

    gate, up, down = (BlastShape.make(5632, 2048, 760, 4), BlastShape.make(5632, 2048, 640, 4),
                      BlastShape.make(2048, 5632, 768, 4))
    layers = _members((gate, up, down), dtype, code_dtype)
    x2 = torch.empty(T, 2048, dtype=dtype, device=META)
    for cfg in _per_mode(mlp_chain.candidates(META), every):
        mlp_chain.blast_mlp_chain_gemv(x2, *layers, cfg)


def _block_tail(T: int, dtype, every: bool = True, code_dtype=None) -> None:
    """A block's tail: o (2048 x 2048), the norm, and a gated MLP whose gate and up differ in rank,
    with float factors or codes of ``code_dtype``."""
    from blastfx.kernels import block_tail
    from blastfx.structures.blast.layout import BlastShape

    shapes = (BlastShape.make(2048, 2048, 512, 4), BlastShape.make(5632, 2048, 760, 4),
              BlastShape.make(5632, 2048, 640, 4), BlastShape.make(2048, 5632, 768, 4))
    o, gate, up, down = _members(shapes, dtype, code_dtype)
    x2, residual = (torch.empty(T, 2048, dtype=dtype, device=META) for _ in range(2))
    weight = torch.empty(2048, dtype=dtype, device=META)
    for cfg in _per_mode(block_tail.candidates(META), every):
        block_tail.blast_block_tail_gemv(x2, residual, o, weight, 1e-5, gate, up, down, cfg)


def _block_seam(T: int, dtype, every: bool = True, code_dtype=None) -> None:
    """A block tail and the next block's q/k/v (k and v narrower) across the norm, with float factors
    or codes of ``code_dtype``."""
    from blastfx.kernels import block_tail
    from blastfx.structures.blast.layout import BlastShape

    shapes = (BlastShape.make(2048, 2048, 512, 4), BlastShape.make(5632, 2048, 760, 4),
              BlastShape.make(5632, 2048, 640, 4), BlastShape.make(2048, 5632, 768, 4),
              BlastShape.make(2048, 2048, 512, 4), BlastShape.make(512, 2048, 128, 4),
              BlastShape.make(512, 2048, 128, 4))
    o, gate, up, down, *heads = _members(shapes, dtype, code_dtype)
    x2, residual = (torch.empty(T, 2048, dtype=dtype, device=META) for _ in range(2))
    weight = torch.empty(2048, dtype=dtype, device=META)
    for cfg in _per_mode(block_tail.candidates(META), every):
        block_tail.blast_block_seam_gemv(x2, residual, o, weight, 1e-5, gate, up, down, weight, 1e-5, heads, cfg)


def _add_norm(H: int, dtype) -> None:
    """The block ops' parts: the residual add and RMSNorm of one decode token, h into a wider output."""
    from blastfx.kernels import add_norm

    a, b = (torch.empty(1, H, dtype=dtype, device=META) for _ in range(2))
    out = torch.empty(1, 2 * H, dtype=dtype, device=META)
    add_norm.add_rms_norm_triton(a, b, torch.empty(H, dtype=dtype, device=META), 1e-5, h_out=out[:, :H])


def _grad_mix(dtype, blocks=None) -> None:
    """The backward middle for every power-of-two pair of block counts the CUDA op runs it for (or
    just ``blocks``)."""
    from blastfx.kernels import backward

    counts = [1 << k for k in range(6)]
    pairs = [blocks] if blocks else [(bo, bi) for bo in counts for bi in counts
                                     if backward.kernel_beats_reference(bo, bi)]
    for b_out, b_in in pairs:
        z = torch.empty(b_in, 256, 512, dtype=dtype, device=META)
        gw = torch.empty(b_out, 256, 512, dtype=dtype, device=META)
        S = torch.empty(b_out, b_in, 512, dtype=dtype, device=META)
        backward.grad_mix_triton(z, gw, S)


def _ss1(T: int, dtype, reduction: int = 4) -> None:
    """The SS1 kernels (tensor-core, at T <= 4 CUDA-core, and the folded copies and GEMM where the
    reduction allows them) over their candidates for T tokens."""
    from blastfx.structures.ss1 import kernel
    from blastfx.structures.ss1.layout import SS1Layout

    layout = SS1Layout(2048, 2048, reduction)
    x2 = torch.empty(T, layout.in_features, dtype=dtype, device=META)
    weight = torch.empty(*layout.weight_shape, dtype=dtype, device=META)
    shifts = torch.empty(layout.k_tiles, layout.n_tiles, dtype=torch.int64, device=META)
    bias = torch.empty(layout.out_features, dtype=dtype, device=META)
    y = torch.empty(T, layout.out_features, dtype=dtype, device=META)
    for cfg in kernel.candidates(T, layout.block_n, layout.block_k, reduction, layout.vec):
        if cfg.get("path", "kernel") in ("kernel", "gemv", "fold"):
            kernel._launch(x2, weight, shifts, bias, y, reduction, layout.block_k, layout.block_n, layout.vec, cfg)
    kernel.expand_triton(weight, shifts, layout.in_features, reduction, layout.block_k, layout.block_n, layout.vec)


def _scenarios():
    """(what, call) pairs. Every config of every table at the base points (bf16 with a bias; T = 1
    for decode and T = 256 for prefill; both layer shapes; each code format); the other token counts
    (GEMV tiles at BT = 2, 4), fp16, fp32 (IEEE dots) and no bias with one config per launch mode."""
    from blastfx.kernels import gemv

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    shapes = _layer_shapes()
    out = [(f"forward T={T} {s.blocks} bf16", lambda T=T, s=s: _forward_paths(T, s, bf16, every=s is shapes[0]))
           for s in shapes for T in (1, 256)]
    out += [(f"forward T={T} bf16, one config per mode", lambda T=T: _forward_paths(T, shapes[0], bf16, every=False))
            for T in (2, 4, 16)]
    out += [("forward T=1 bf16 no bias", lambda: _forward_paths(1, shapes[0], bf16, bias=False, every=False))]
    out += [(f"forward T={T} {dt}", lambda T=T, dt=dt: _forward_paths(T, shapes[0], dt, every=False))
            for dt in (fp16, fp32) for T in (1, 256)]
    # every config with int8 codes at T = 1; int4 shares its tile code, so one config per code variant
    out += [(f"quantized GEMV {cd} T={T}", lambda T=T, cd=cd: _quantized_gemv(
        T, shapes[0], bf16, cd, every=T == 1 and cd == gemv.CODE_DTYPES[0])) for cd in gemv.CODE_DTYPES for T in (1, 2, 4)]
    out += [(f"quantized fused {cd} T={T} {dt}", lambda T=T, cd=cd, dt=dt: _quantized_fused(T, shapes[0], dt, cd))
            for cd in gemv.CODE_DTYPES for T in (8, 256) for dt in (bf16, fp16)]
    out += [(f"quantized decode {cd} T=8", lambda cd=cd: _quantized_decode(8, shapes[0], bf16, cd))
            for cd in gemv.CODE_DTYPES]
    out += [(f"dequantize {cd} {dt}", lambda cd=cd, dt=dt: _dequantize(shapes[0], dt, cd))
            for cd in gemv.CODE_DTYPES for dt in (bf16, fp16)]
    out += [("GEMV single stages", lambda: _gemv_single_stages(shapes[0], bf16))]
    out += [(f"GEMV group T={T}", lambda T=T: _gemv_group(T, bf16, every=T == 1)) for T in (1, 2, 4)]
    out += [(f"MLP chain T={T}", lambda T=T: _mlp_chain(T, bf16, every=T == 1)) for T in (1, 4)]
    # codes: every config of the group with int8 at T = 1, one per code variant otherwise
    out += [(f"quantized GEMV group {cd} T={T}", lambda T=T, cd=cd: _gemv_group(
        T, bf16, every=T == 1 and cd == gemv.CODE_DTYPES[0], code_dtype=cd)) for cd in gemv.CODE_DTYPES for T in (1, 4)]
    out += [(f"quantized MLP chain {cd} T={T}", lambda T=T, cd=cd: _mlp_chain(T, bf16, every=False, code_dtype=cd))
            for cd in gemv.CODE_DTYPES for T in (1, 4)]
    out += [(f"block tail T={T}", lambda T=T: _block_tail(T, bf16, every=T == 1)) for T in (1, 4)]
    out += [(f"quantized block tail {cd} T={T}", lambda T=T, cd=cd: _block_tail(T, bf16, every=False, code_dtype=cd))
            for cd in gemv.CODE_DTYPES for T in (1, 4)]
    out += [(f"block seam T={T}", lambda T=T: _block_seam(T, bf16, every=T == 1)) for T in (1, 4)]
    out += [(f"quantized block seam {cd} T=1", lambda cd=cd: _block_seam(1, bf16, every=False, code_dtype=cd))
            for cd in gemv.CODE_DTYPES]
    out += [(f"add + RMSNorm H={H} {dt}", lambda H=H, dt=dt: _add_norm(H, dt))
            for H, dt in ((4096, bf16), (5120, bf16), (4096, fp16), (8192, fp32))]
    out += [("grad mix bf16", lambda: _grad_mix(bf16))]
    out += [(f"grad mix {dt}", lambda dt=dt: _grad_mix(dt, (4, 4))) for dt in (fp16, fp32)]
    out += [(f"SS1 T={T} {dt}", lambda T=T, dt=dt: _ss1(T, dt)) for T, dt in ((1, bf16), (256, bf16), (1, fp32))]
    out += [(f"SS1 fold T={T} {dt}", lambda T=T, dt=dt: _ss1(T, dt, reduction=2))
            for T, dt in ((16, bf16), (256, bf16), (256, fp16), (256, fp32))]
    return out


def recorded_launches() -> dict[str, Launch]:
    """Every distinct launch of :func:`_scenarios`, by test id, in first-seen order."""
    sink: list[Launch] = []
    with recording(sink):
        for what, call in _scenarios():
            try:
                call()
            except Exception as e:
                raise RuntimeError(f"recording the launches of '{what}' failed: {e}") from e
    out, seen = {}, set()
    for launch in sink:
        if launch in seen:
            continue
        seen.add(launch)
        label, k = launch.label(), 2
        while label in out:                     # same constexprs and dtypes, different argument dtypes
            label, k = f"{launch.label()}#{k}", k + 1
        out[label] = launch
    return out


# ---------------------------------------------------------------------------------------------
# Compiling them

triton = pytest.importorskip("triton")


@functools.cache
def launches() -> dict[str, Launch]:
    """:func:`recorded_launches`, recorded once (at collection)."""
    return recorded_launches()


def _ptxas_path(nvidia_compiler) -> str | None:
    """Where triton's nvidia backend finds ptxas for sm_90, or None where it finds none."""
    get = getattr(nvidia_compiler, "get_ptxas", None)
    if get is None:
        return None
    try:
        try:
            tool = get(TARGET[1])
        except TypeError:                       # triton versions whose get_ptxas takes no arch
            tool = get()
    except RuntimeError:                        # "Cannot find ptxas"
        return None
    path = tool[0] if isinstance(tool, tuple) else getattr(tool, "path", tool)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def cuobjdump_path() -> str | None:
    """The ``cuobjdump`` shipped beside triton's ptxas (it reads a cubin's register use), or None."""
    from triton.backends.nvidia import compiler as nvidia_compiler

    ptxas = _ptxas_path(nvidia_compiler)
    path = os.path.join(os.path.dirname(ptxas), "cuobjdump") if ptxas else None
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def missing_toolchain() -> str | None:
    """What this triton lacks to compile for sm_90 without a GPU (its nvidia backend, ptxas, the
    compile API used here), or None."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no nvidia backend (backends: {sorted(backends)})"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler as nvidia_compiler
        from triton.compiler import ASTSource
    except ImportError as e:
        return f"triton {triton.__version__} lacks {e.name or e}"
    if _ptxas_path(nvidia_compiler) is None:
        return f"triton {triton.__version__}'s nvidia backend finds no ptxas (TRITON_PTXAS_PATH unset or wrong?)"
    if not {"constexprs", "attrs"} <= set(inspect.signature(ASTSource).parameters):
        return f"triton {triton.__version__}'s ASTSource takes no constexprs/attrs arguments"
    return None


def _workers(count: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4, math.ceil(count / 8)))


def compile_in_workers(specs: list[dict], scratch: Path) -> dict[str, dict]:
    """Compile ``specs`` in worker processes (round-robin, one per core up to 4) that import blastfx
    without the interpreter; {id: {"error": str | None, "seconds": float}}. A launch a worker never
    reported (it crashed or ran out of time) gets an error saying so, with the end of its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")     # the launches' default; set, it silences a warning
    env["TRITON_CACHE_DIR"] = str(scratch / "cache")    # a fresh cache: every launch is compiled from source
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    n = _workers(len(specs))
    jobs = []
    for k in range(n):
        specs_path, results_path, log = (scratch / f"worker{k}.{ext}" for ext in ("json", "out", "log"))
        specs_path.write_text(json.dumps(specs[k::n]))
        with open(log, "w") as stderr:
            proc = subprocess.Popen([sys.executable, __file__, "--compile", str(specs_path), str(results_path)],
                                    cwd=REPO, env=env, stdout=stderr, stderr=subprocess.STDOUT)
        jobs.append((proc, results_path, log, specs[k::n]))
    results = {}
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    for proc, results_path, log, chunk in jobs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if results_path.exists():
            for line in results_path.read_text().splitlines():
                row = json.loads(line)
                results[row["id"]] = row
        tail = log.read_text()[-3000:] if log.exists() else ""
        for spec in chunk:
            results.setdefault(spec["id"], {"error": f"the compile worker (exit code {proc.returncode}) never "
                                                     f"reported this launch; its output ends:\n{tail}", "seconds": 0.0})
    return results


def compile_launches(ids, scratch: Path, results: dict) -> dict[str, dict]:
    """The compile results (with register use where ``cuobjdump`` is there) of the launches ``ids``,
    compiling those that ``results`` (the session's, by launch id) does not hold yet."""
    missing = [i for i in dict.fromkeys(ids) if i not in results]
    if missing:
        resources = cuobjdump_path() is not None
        results.update(compile_in_workers([{**launches()[i].spec(i), "resources": resources} for i in missing],
                                          scratch))
    return {i: results[i] for i in ids}


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory, sm90_results):
    """The compile results of every launch this pytest run selected (all, or those ``-k`` keeps)."""
    missing = missing_toolchain()
    if missing:
        pytest.skip(f"cannot compile for sm_90 on this machine: {missing}")
    wanted = [item.callspec.params["launch_id"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "launch_id" in item.callspec.params]
    return compile_launches(wanted, tmp_path_factory.mktemp("sm90"), sm90_results)


def pytest_generate_tests(metafunc):
    """One test per distinct recorded launch (recorded at collection, not when run as a worker)."""
    if "launch_id" in metafunc.fixturenames:
        ids = list(launches())
        metafunc.parametrize("launch_id", ids, ids=ids)


def test_compiles_for_sm90(compiled, launch_id):
    error = compiled[launch_id]["error"]
    if error:
        pytest.fail(f"{launch_id} does not compile for sm_90:\n{error}", pytrace=False)


# ---------------------------------------------------------------------------------------------
# What is covered


def _source_of(module_name: str) -> str:
    return Path(importlib.import_module(module_name).__file__).read_text()


def test_every_module_with_kernels_is_recorded():
    """A module of blastfx that defines a @triton.jit function is one whose kernels are recorded."""
    found = set()
    for path in (REPO / "blastfx").rglob("*.py"):
        if "@triton.jit" in path.read_text():
            found.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    assert found <= set(KERNEL_MODULES), f"kernels defined in {sorted(found - set(KERNEL_MODULES))} are not recorded"


def test_every_launched_kernel_is_compiled():
    """Every kernel a module launches (``kernel[grid](...)`` or through ``launch_persistent``) has at
    least one recorded launch: a new kernel without a scenario here fails this."""
    recorded = {(launch.module, launch.kernel) for launch in launches().values()}
    for module_name in KERNEL_MODULES:
        source = _source_of(module_name)
        kernels = set(_kernels_of(importlib.import_module(module_name)))
        launched = set(re.findall(r"\b(\w+)\[[^\]\n]+\]\(", source))
        launched |= set(re.findall(r"launch_persistent\((\w+)", source))
        for name in sorted(launched & kernels):
            assert (module_name, name) in recorded, f"{module_name}.{name} is launched but no launch of it is recorded"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile recorded kernel launches for sm_90 (a worker of the tests)")
    parser.add_argument("--compile", nargs=2, metavar=("SPECS", "RESULTS"), required=True)
    _work(*parser.parse_args().compile)
