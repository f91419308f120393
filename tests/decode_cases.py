"""Shared cases of the decode-kernel tests: stored-layout factors (padding zero), float or quantized
to codes, and checks of a kernel's output against the float64 reference."""
import math

import torch

from blastfx.structures.blast.layout import BlastShape
from blastfx.structures.blast.ops import blast_matmul_reference
from blastfx.structures.blast.quant import formats
from blastfx.structures.blast.quant.ops import blast_matmul_quantized_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def blocks_fit(m, n, b_out, b_in) -> bool:
    """Whether b_out x b_in blocks cut an m x n layer with no block all padding: BlastShape refuses
    such counts, so fuzzed cases that draw them are skipped."""
    return all((count - 1) * math.ceil(dim / count) < dim for count, dim in ((b_out, m), (b_in, n)))


def factors(m, n, r, b_out, b_in, dtype, bias=True, seed=0):
    """(shape, U, S, V, bias) on DEVICE in ``dtype``, with padding rows zero as stored."""
    shape = BlastShape.make(m, n, r, (b_out, b_in), allow_larger=True)
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(shape.b_out, shape.p, r, generator=g) / math.sqrt(r)
    V = torch.randn(shape.b_in, shape.q, r, generator=g) / math.sqrt(shape.q)
    S = torch.randn(b_out, b_in, r, generator=g)
    U.view(-1, r)[m:] = 0
    V.view(-1, r)[n:] = 0
    b = torch.randn(m, generator=g) if bias else None
    to = dict(device=DEVICE, dtype=dtype)
    return shape, U.to(**to), S.to(**to), V.to(**to), (b.to(**to) if b is not None else None)


def check(kernel, T, m, n, r, b_out, b_in, dtype, bias, cfg=None, seed=0):
    """``kernel(x, U, S, V, b, shape, cfg, interpret=...)`` on random factors equals the float64
    reference within ``dtype``'s tolerance (relative to the largest output)."""
    shape, U, S, V, b = factors(m, n, r, b_out, b_in, dtype, bias, seed)
    x = torch.randn(T, n, device=DEVICE, dtype=dtype)
    y = kernel(x, U, S, V, b, shape, cfg, interpret=not CUDA)
    ref = blast_matmul_reference(x.double(), U.double(), S.double(), V.double(),
                                 b.double() if b is not None else None, m)
    assert y.shape == (T, m) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert (y.double() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6) < TOL[dtype]


def coded_factors(m, n, r, b_out, b_in, seed=0, name="int8"):
    """(shape, [U codes, U_scale, S, V codes, V_scale, bias]) on DEVICE: factors with rows and
    columns of unequal scale (so per-row and per-rank scales matter), padding zero as stored,
    quantized to the format ``name``; S and bias float32."""
    shape = BlastShape.make(m, n, r, (b_out, b_in), allow_larger=True)
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(shape.b_out, shape.p, r, generator=g) * torch.rand(shape.b_out, shape.p, 1, generator=g)
    V = torch.randn(shape.b_in, shape.q, r, generator=g) * torch.rand(shape.b_in, 1, r, generator=g)
    U.view(-1, r)[m:] = 0
    V.view(-1, r)[n:] = 0
    fmt = formats.get(name)
    (Uc, su), (Vc, sv) = formats.quantize_u(U, fmt), formats.quantize_v(V, fmt)
    S = torch.randn(b_out, b_in, r, generator=g)
    b = torch.randn(m, generator=g)
    return shape, [t.to(DEVICE) for t in (Uc, su, S, Vc, sv, b)]


def close_to_quantized_reference(y, x, Uc, su, S, Vc, sv, b, m):
    """``y`` equals the float64 product of the dequantized factors within its dtype's tolerance
    (relative to the largest output)."""
    ref = blast_matmul_quantized_reference(x.double(), Uc, su, S.double(), Vc, sv,
                                           b.double() if b is not None else None, m)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert (y.double() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6) < TOL[y.dtype]


def forced_forms(monkeypatch, forms):
    """Each of ``forms`` (labels of a multi-layer decode op's two forms) in turn, with the Triton paths
    on and the autotuner made to pick that form: the op's CUDA kernel then runs it (on the CPU under
    the interpreter)."""
    from blastfx.kernels import autotune, dispatch

    monkeypatch.setattr(dispatch, "forward_impl", lambda dtype: "triton")
    for form in forms:
        monkeypatch.setattr(autotune, "choose", lambda key, candidates, run, copies=1, form=form:
                            next(c for c in candidates if c[0] == form))
        yield form
