"""Where a decode-sized BLAST call spends its time: each stage of the decode kernels alone, both, and
each launch mode, against dense cuBLAS and the measured streaming bandwidth of the GPU.

    python benchmarks/decode_stages.py                  # Llama-2-7B layer shapes, b = 4, T = 1
    python benchmarks/decode_stages.py --kernel decode  # the tensor-core slot kernel instead of the GEMV one
    python benchmarks/decode_stages.py --sweep --no-chain   # + each GEMV stage alone over a grid of tile configs

Stage 1 streams V (x·V with the s-mix), stage 2 streams U (w·Uᵀ), each alone with the default tiles
and (GEMV kernel) with narrow r-tiles (``BR=64``: fewer atomics in stage 1). Each launch mode of the kernel is
timed (for the GEMV kernel: two launches, one persistent launch with and without the L2 prefetch of
U, and with each program's first U tile loaded into registers before stage 1 ("preload"), and
programmatic dependent launches with and without prefetch; "late" runs stage 1 with its
workspace bookkeeping after the V stream instead of before it), then the seven linears of one
Llama-2-7B block called in a row (four blocks' worth of weights, so they stream from HBM), where
a programmatic dependent launch also overlaps one layer's start with the previous layer's tail. Each time is a CUDA-graph replay over weight copies rotated out of L2; the
bandwidths are the factor bytes over that time, beside the "stream" bandwidth (a dense GEMV's, the
best a read of the same bytes reaches on this GPU) and the copy bandwidth (``copy_``: bytes read plus
bytes written over the time, once for a buffer of each stage's factor bytes, timed the same way, and
once for 1 GiB, the GPU's sustained rate), so the gap per stage is explicit: what a stage loses to its
size (the small copy's shortfall) and what it loses to its own work.

The launch model says what any design could reach: dense GEMVs of six sizes are fitted to
``time = t0 + bytes / bandwidth`` (t0: what one kernel costs besides its bytes, launch in the graph,
ramp and tail included), and each shape gets the speedup that one launch and two launches streaming
the BLAST factors would give if each paid the dense GEMV's t0 ("one-launch ceiling", "two-launch
ceiling"); the block rows get the same for one launch per linear.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from blastfx.kernels import decode, forward, gemv
from blastfx.structures.blast.layout import BlastShape
from common import copies_for, graph_ms, versions
from rows import add_arguments, measurements, record


# stage 1: (BQ, BR) tiles of 4-64 KB of bf16, warps, pipeline stages, programs per SM (sets the q-split)
STAGE1_SWEEP = [dict(BQ=bq, BR=br, warps=w, stages=st, per_sm=ps)
                for (bq, br), w, st, ps in itertools.product(
                    ((16, 512), (32, 512), (64, 512), (32, 256), (64, 256), (128, 256), (64, 128), (128, 128),
                     (256, 128), (128, 64), (256, 64)), (4, 8), (1, 3), (1, 2, 4))]
# stage 2: (BP, BK) tiles, warps, pipeline stages (its grid is b_out x p-tiles, whatever per_sm says)
STAGE2_SWEEP = [dict(BP=bp, BK=bk, warps=w, warps2=w, stages=st)
                for (bp, bk), w, st in itertools.product(
                    ((4, 1024), (8, 1024), (8, 512), (16, 512), (32, 512), (16, 256), (32, 256), (64, 256),
                     (32, 128), (64, 128)), (4, 8), (1, 3))]


def sweep(x, fac, shape, v_bytes, u_bytes, keep=8):
    """(metrics, lines): each stage alone, mode "two", over its sweep; the ``keep`` fastest configs of
    each stage become rows, every config a printed line."""
    metrics, lines = [], []
    for stage, grid, nbytes in ((1, STAGE1_SWEEP, v_bytes), (2, STAGE2_SWEEP, u_bytes)):
        timed = []
        for tiles in grid:
            cfg = {**gemv.DEFAULT, "mode": "two", **tiles}
            try:
                t = graph_ms(lambda k: gemv.blast_gemv(x, *fac[k], None, shape, cfg, only_stage=stage), len(fac))
            except Exception as err:                            # noqa: BLE001 -- e.g. out of registers
                print(f"  stage {stage} {tiles}: {type(err).__name__}", flush=True)
                continue
            timed.append((t, " ".join(f"{k}={v}" for k, v in tiles.items() if k != "warps2")))
        timed.sort()
        for t, label in timed[:keep]:
            metrics += [(f"stage {stage} {label} time", t, "ms"),
                        (f"stage {stage} {label} bandwidth", round(nbytes / t / 1e6), "GB/s")]
        lines += [f"  stage {stage}: {label} {t * 1e3:.2f} us ({nbytes / t / 1e6:.0f} GB/s)" for t, label in timed]
    return metrics, lines


# out_features of the dense GEMVs (in_features = the layers' hidden size) that the launch model is fitted on
MODEL_ROWS = (1024, 2048, 4096, 8192, 16384, 32768)


def fit_launch_model(points) -> tuple[float, float]:
    """(t0 in ms, bandwidth in bytes per ms) of ``time = t0 + bytes / bandwidth``, fitted by least
    squares on (bytes, ms) points of dense GEMVs. Why: at decode every kernel pays a fixed cost
    (its launch in the graph, the ramp until enough loads are in flight, the tail) besides its
    bytes, and a BLAST call halves the bytes but not that cost; the fit says, from dense GEMVs run
    in the same process, what speedup one launch or two launches of half the bytes could reach."""
    if len(points) < 2 or len({b for b, _ in points}) < 2:
        raise ValueError(f"the launch model needs GEMVs of at least two sizes, got {len(points)} point(s)")
    A = torch.tensor([[1.0, float(b)] for b, _ in points], dtype=torch.float64)
    y = torch.tensor([[float(t)] for _, t in points], dtype=torch.float64)
    t0, per_byte = torch.linalg.lstsq(A, y).solution.flatten().tolist()
    if per_byte <= 0:
        raise ValueError(f"the GEMV times do not grow with their bytes ({points}): no bandwidth to fit")
    return t0, 1.0 / per_byte


def ceiling(t_dense: float, model: tuple[float, float], nbytes: int, launches: int) -> float:
    """Dense time over what ``launches`` kernels streaming ``nbytes`` take under the launch model:
    the most a design with that many launches can gain if each launch costs what a dense GEMV's does."""
    t0, bandwidth = model
    return t_dense / (launches * t0 + nbytes / bandwidth)


def launch_model(T: int, n: int, dt, dev: str, rows=MODEL_ROWS) -> tuple[tuple[float, float], list]:
    """The launch model of dense GEMVs (T x n inputs, ``rows`` x n weights) on this GPU, and its
    metrics: each GEMV's time, the fixed cost per launch and the marginal bandwidth."""
    x = torch.randn(T, n, device=dev, dtype=dt)
    points, metrics = [], []
    for m in rows:
        copies = copies_for(m * n * 2)
        weights = [torch.randn(m, n, device=dev, dtype=dt) for _ in range(copies)]
        t = graph_ms(lambda k: torch.nn.functional.linear(x, weights[k]), copies)
        points.append((m * n * 2, t))
        metrics.append((f"dense {m}x{n} time", t, "ms"))
        del weights
    t0, bandwidth = fit_launch_model(points)
    return (t0, bandwidth), metrics + [("fixed cost per launch", round(t0 * 1e3, 2), "us"),
                                       ("marginal bandwidth", round(bandwidth / 1e6), "GB/s")]


def copy_gbs(nbytes: int, device: str = "cuda") -> float:
    """GB/s of ``dst.copy_(src)`` for ``nbytes``-byte buffers (read + write), over rotated copies."""
    n = max(1, nbytes // 2)
    copies = copies_for(2 * nbytes)
    src = [torch.empty(n, device=device, dtype=torch.bfloat16).normal_() for _ in range(copies)]
    dst = [torch.empty_like(t) for t in src]
    t = graph_ms(lambda k: dst[k].copy_(src[k]), copies)
    return 2 * n * 2 / t / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"], help="OUTxIN")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--kernel", choices=("gemv", "decode"), default="gemv")
    ap.add_argument("--no-chain", action="store_true", help="skip the block of seven linears in a row")
    ap.add_argument("--sweep", action="store_true", help="each GEMV stage alone over a grid of tile configs")
    add_arguments(ap)
    args = ap.parse_args()
    dt, dev = torch.bfloat16, "cuda"
    print(versions(), flush=True)
    if args.kernel == "gemv":
        D = gemv.DEFAULT
        modes = {"two": {**D, "mode": "two"}, "persistent": {**D, "mode": "persistent"},
                 "persistent+prefetch": {**D, "mode": "persistent", "prefetch": 2},
                 "pdl": {**D, "mode": "pdl"}, "pdl+prefetch": {**D, "mode": "pdl", "prefetch": 1},
                 "two late": {**D, "mode": "two", "late": True},
                 "pdl+prefetch late": {**D, "mode": "pdl", "prefetch": 1, "late": True}}
        # the persistent kernel with the tall-narrow stage-1 tile (no spills), and with U preloaded
        narrow = {**D, "mode": "persistent", "BQ": 128, "BR": 64, "stages": 3, "BP": 8}
        modes.update({"persistent narrow": narrow, "persistent narrow+preload": {**narrow, "preload": True},
                      "persistent narrow+preload BP=16": {**narrow, "preload": True, "BP": 16}})
        run, staged = gemv.blast_gemv, modes["two"]
        # narrow r-tiles: fewer q-chunks fill the grid, so stage 1 issues fewer atomics
        stage_configs = {"": staged, " BR=64": {**staged, "BQ": 64, "BR": 64}, " late": {**staged, "late": True},
                         " BR=64 late": {**staged, "BQ": 64, "BR": 64, "late": True}}
    else:
        modes = {c["mode"]: c for c in reversed(decode.CANDIDATES)}     # the first config of each mode
        run, staged = decode.blast_decode, {**modes["pdl"], "mode": "two"}
        stage_configs = {"": staged}
    usable = {k: c for k, c in modes.items() if c["mode"] != "pdl" or decode.pdl_supported(torch.device(dev))}
    models, n = {}, int(args.shapes[0].split("x")[1])
    for T in args.tokens:
        models[T], fitted = launch_model(T, n, dt, dev)
        print(f"dense GEMV launch model, {n} inputs, T={T}: " + ", ".join(f"{k} {v:.4g}{u}" for k, v, u in fitted),
              flush=True)
        record("decode_stages", measurements(f"dense GEMV launch model T={T}", dict(T=T, dtype="bfloat16", **{"in": n}),
                                             fitted), directory=args.results_dir)
    for text in args.shapes:
        m, n = map(int, text.split("x"))
        r = int(args.budget * m * n / (m + n + args.blocks ** 2)) // 16 * 16
        shape = BlastShape.make(m, n, r, args.blocks)
        nd = copies_for(m * n * 2)
        dense = [torch.randn(m, n, device=dev, dtype=dt) / n ** 0.5 for _ in range(nd)]
        fac = [tuple(torch.randn(*shape.factor_shapes[k], device=dev, dtype=dt) * 0.05 for k in "USV")
               for _ in range(copies_for(shape.num_params * 2))]
        v_bytes, u_bytes = V_bytes(shape), U_bytes(shape)
        for T in args.tokens:
            x = torch.randn(T, n, device=dev, dtype=dt)
            t_dense = graph_ms(lambda k: torch.nn.functional.linear(x, dense[k]), nd)
            stream = m * n * 2 / t_dense / 1e6                                   # GB/s
            metrics = [("dense time", t_dense, "ms"), ("dense stream bandwidth", round(stream), "GB/s"),
                       ("copy bandwidth, 1 GiB", round(copy_gbs(2 ** 30)), "GB/s"),
                       ("copy bandwidth, stage 1 bytes", round(copy_gbs(v_bytes)), "GB/s"),
                       ("copy bandwidth, stage 2 bytes", round(copy_gbs(u_bytes)), "GB/s")]
            for tiles, cfg in stage_configs.items():
                for stage, nbytes in ((1, v_bytes), (2, u_bytes)):
                    t = graph_ms(lambda k: run(x, *fac[k], None, shape, cfg, only_stage=stage), len(fac))
                    metrics += [(f"stage {stage}{tiles} time", t, "ms"),
                                (f"stage {stage}{tiles} bandwidth", round(nbytes / t / 1e6), "GB/s")]
            for mode, cfg in usable.items():
                t = graph_ms(lambda k: run(x, *fac[k], None, shape, cfg), len(fac))
                metrics += [(f"{mode} time", t, "ms"), (f"{mode} vs dense", round(t_dense / t, 3), "x")]
            t_best = graph_ms(lambda k: forward.blast_matmul_triton(x, *fac[k]), len(fac))
            factor_bytes = shape.num_params * 2
            metrics += [("blastfx vs dense", round(t_dense / t_best, 3), "x"),
                        ("ideal vs dense", round(m * n / shape.num_params, 3), "x"),
                        ("one-launch ceiling vs dense", round(ceiling(t_dense, models[T], factor_bytes, 1), 3), "x"),
                        ("two-launch ceiling vs dense", round(ceiling(t_dense, models[T], factor_bytes, 2), 3), "x")]
            print(f"{m}x{n} b={args.blocks} r={r} T={T}: " + ", ".join(
                f"{k} {v:.4g}{u}" for k, v, u in metrics), flush=True)
            case = f"{m}x{n} b={args.blocks} T={T}"
            params = dict(out=m, b=args.blocks, r=r, T=T, budget=args.budget, dtype="bfloat16", **{"in": n})
            if args.sweep and args.kernel == "gemv":
                swept, lines = sweep(x, fac, shape, v_bytes, u_bytes)
                print("\n".join(lines), flush=True)
                record("decode_stage_sweep", measurements(case, params, swept), directory=args.results_dir)
            record("decode_stages", measurements(case, params, metrics), directory=args.results_dir)
        del dense, fac
    if not args.no_chain:
        chain(args, usable, run, models)


def chain(args, modes, run, models, blocks=4, hidden=4096, inter=11008):
    """One Llama-2-7B block's linears (q, k, v, o, gate, up, down) called in a row, ``blocks`` blocks'
    worth of distinct weights: dense, blastfx as the autotuner picks, and each launch mode."""
    dt, dev = torch.bfloat16, "cuda"
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    for T in args.tokens:
        xs = {n: torch.randn(T, n, device=dev, dtype=dt) for n in (hidden, inter)}
        dense = [torch.randn(m, n, device=dev, dtype=dt) / n ** 0.5 for _ in range(blocks) for m, n in shapes]
        t_dense = graph_ms(lambda k: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in dense], 1)
        del dense
        layers = []
        for _ in range(blocks):
            for m, n in shapes:
                r = int(args.budget * m * n / (m + n + args.blocks ** 2)) // 16 * 16
                shape = BlastShape.make(m, n, r, args.blocks)
                layers.append((shape, tuple(torch.randn(*shape.factor_shapes[k], device=dev, dtype=dt) * 0.05
                                            for k in "USV")))
        calls = {"blastfx": lambda k: [forward.blast_matmul_triton(xs[s.in_features], *f, None, s.out_features)
                                       for s, f in layers]}
        for mode, cfg in modes.items():
            calls[mode] = lambda k, cfg=cfg: [run(xs[s.in_features], *f, None, s, cfg) for s, f in layers]
        calls["blastfx"](0)                                     # tune each shape outside the timed graph
        factor_bytes = sum(s.num_params * 2 for s, _ in layers)
        metrics = [("dense time", t_dense, "ms"),
                   ("one-launch ceiling vs dense", round(ceiling(t_dense, models[T], factor_bytes, len(layers)), 3), "x"),
                   ("two-launch ceiling vs dense", round(ceiling(t_dense, models[T], factor_bytes, 2 * len(layers)), 3),
                    "x")]
        for name, call in calls.items():
            t = graph_ms(call, 1)
            metrics += [(f"{name} time", t, "ms"), (f"{name} vs dense", round(t_dense / t, 3), "x")]
        print(f"Llama-2-7B block x{blocks}, 7 linears each, T={T}: " + ", ".join(
            f"{k} {v:.4g}{u}" for k, v, u in metrics), flush=True)
        record("decode_stages", measurements(f"llama2-7b block linears x{blocks} T={T}", dict(
            blocks=blocks, b=args.blocks, T=T, budget=args.budget, dtype="bfloat16", kernel=args.kernel), metrics),
            directory=args.results_dir)
        del layers


def V_bytes(shape):
    """Bytes of V as stored (padded), bf16."""
    return shape.b_in * shape.q * shape.rank * 2


def U_bytes(shape):
    """Bytes of U as stored (padded), bf16."""
    return shape.b_out * shape.p * shape.rank * 2


if __name__ == "__main__":
    main()
