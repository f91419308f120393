"""Graph pass: find the original BLAST code's three-stage forward and replace it by the fused op.

The original ``BlastLinear.forward`` (github.com/changwoolee/BLAST) computes, with B (b1, p, r),
C (b2, r, q), D (b1, b2, r) and xb = x.view(-1, b2, q).transpose(0, 1)::

    y = torch.bmm(xb, C.transpose(1, 2))          # (b2, T, r)
    z = (y.unsqueeze(0) * D.unsqueeze(2)).sum(1)   # (b1, T, r), via a (b1, b2, T, r) temporary
    out = torch.bmm(z, B.transpose(1, 2))          # (b1, T, p)

We match that subgraph in a dynamo FX graph (method and function spellings alike) and replace
``out`` by :func:`naive_blast_replacement`, which calls ``blastfx::blast_matmul`` with
U = B, S = D, V = C^T.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

_FUNCTIONS = {torch.bmm: "bmm", torch.matmul: "bmm", operator.mul: "mul", torch.mul: "mul", torch.sum: "sum",
              torch.transpose: "transpose", torch.unsqueeze: "unsqueeze"}


def _as_call(node, name):
    """Positional args (self first) if ``node`` is the op ``name`` in either spelling, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == name:
        pass
    elif node.op == "call_function" and _FUNCTIONS.get(node.target) == name:
        pass
    else:
        return None
    args = list(node.args)
    if "dim" in node.kwargs:
        args.append(node.kwargs["dim"])
    if name == "transpose" and len(args) == 3 and "dim0" in node.kwargs:
        return None
    return args


def _transposed_12(node):
    """X if node is X.transpose(1, 2) (or (-2, -1) on a 3-D tensor), else None."""
    args = _as_call(node, "transpose")
    if args and len(args) == 3 and {args[1], args[2]} in ({1, 2}, {-2, -1}, {1, -1}):
        return args[0]
    return None


def _match(out_bmm):
    args = _as_call(out_bmm, "bmm")
    if not args or len(args) != 2:
        return None
    z, B = args[0], _transposed_12(args[1])
    zargs = _as_call(z, "sum")
    if B is None or not zargs or len(zargs) != 2 or zargs[1] != 1:
        return None
    margs = _as_call(zargs[0], "mul")
    if not margs or len(margs) != 2:
        return None
    y = D = None
    for a, b in (margs, margs[::-1]):
        ua, ub = _as_call(a, "unsqueeze"), _as_call(b, "unsqueeze")
        if ua and ub and ua[1] == 0 and ub[1] == 2:
            y, D = ua[0], ub[0]
    yargs = _as_call(y, "bmm") if y is not None else None
    if not yargs or len(yargs) != 2:
        return None
    C = _transposed_12(yargs[1])
    if C is None:
        return None
    return yargs[0], B, C, D


def naive_blast_with(matmul, xb, B, C, D):
    """Same value as the three-stage code, xb (b2, T, q) -> (b1, T, p), through ``matmul`` (the op,
    or the compiler's inlined form of it)."""
    b2, T, q = xb.shape
    x_flat = xb.transpose(0, 1).reshape(T, b2 * q)
    y = matmul(x_flat, B, D, C.transpose(1, 2), None, None)
    return y.view(T, B.shape[0], B.shape[1]).transpose(0, 1)


def naive_blast_replacement(xb, B, C, D):
    return naive_blast_with(torch.ops.blastfx.blast_matmul, xb, B, C, D)


def fuse_naive_blast(gm: fx.GraphModule) -> int:
    """Rewrite every naive BLAST subgraph in ``gm``; returns how many were replaced."""
    count = 0
    for node in list(gm.graph.nodes):
        found = _match(node)
        if found is None:
            continue
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(naive_blast_replacement, found)
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
