"""``blastfx`` command line: analyze, compress and evaluate a causal LM (a GGUF file or HF folder).

Every argument is checked before a model is loaded (paths, numbers, the output folder, the
calibration text), so a typo costs a second, not a model load and a compression. Errors are one
line on stderr with exit code 2 (1 for a failure during the work itself); ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEFAULT_CALIBRATION_TOKENS = 8192
CALIBRATION_WINDOW = 512
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_ONLY_WARNING = (
    "warning: --calibrate 0 factorizes the weights alone, blind to the inputs the layers see: on "
    "SmolLM2-135M at budget 0.8 weight-only SVD and PrecGD gave over 100,000x the dense perplexity, "
    f"against 1.54x with the default {DEFAULT_CALIBRATION_TOKENS} calibration tokens")


class UsageError(Exception):
    """A bad argument, reported as one line (argparse's own errors included)."""


class Parser(argparse.ArgumentParser):
    """argparse, but its errors are raised (one line, exit code 2 in :func:`main`) instead of printing
    the usage block and exiting: callers of ``main(argv)`` get a return code, not ``SystemExit``."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


# ---- argument types: each checks one value and names it in its error ----------------------------------

def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value!r}")
    return number


def budget(value: str) -> float:
    from ..plan import check_budget
    try:
        return check_budget(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1), the fraction of compressible "
                                         f"parameters kept; got {value!r}") from None


def _int_at_least(low: int, what: str):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}")
        return number
    return parse


positive_int = _int_at_least(1, "a positive integer")
count = _int_at_least(0, "an integer >= 0")


def model_source(value: str) -> str:
    """A ``.gguf`` file, or a folder with ``config.json`` and tokenizer files (what the loader needs)."""
    path = Path(value)
    if path.is_file():
        if path.suffix != ".gguf":
            raise argparse.ArgumentTypeError(f"{value!r} is a file but not a .gguf model "
                                             "(pass a .gguf file or an HF model folder)")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise argparse.ArgumentTypeError(f"{value!r} is not a model folder: it has no config.json "
                                             "(pass a .gguf file or an HF model folder)")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise argparse.ArgumentTypeError(f"{value!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                                             "save the tokenizer beside the model")
    else:
        raise argparse.ArgumentTypeError(f"no model at {value!r} (pass a .gguf file or an HF model folder)")
    return value


def text_file(value: str) -> Path:
    """A readable, non-empty UTF-8 text file."""
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {value!r} as UTF-8 text: {err}") from None
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is empty")
    return path


# ---- checks that need several arguments ---------------------------------------------------------------

def check_out(out: Path, overwrite: bool) -> None:
    """The output folder can be written, before any work: not a file, not a non-empty folder unless
    ``--overwrite`` (and then only a model folder), and its parent writable (a probe file is created
    and removed there, which is what the atomic save needs: a sibling ``.partial`` folder renamed in)."""
    partial = out.with_name(out.name + ".partial")
    if out.is_file() or out.is_symlink() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder")
    if partial.exists() and not partial.is_dir():
        raise UsageError(f"--out {str(out)!r}: {str(partial)!r} is in the way (a file; the save writes a folder there)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {str(out)!r} exists and is not empty (pass --overwrite)")
        if not (out / "config.json").is_file():
            raise UsageError(f"--out {str(out)!r} is not a model folder (no config.json): refusing to overwrite it")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {str(out)!r}: {str(parent)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UsageError(f"--out {str(out)!r}: cannot write in {str(parent)!r} ({err.strerror or err})") from None


def resolve_recipe(args) -> None:
    """Fill in the defaults that depend on other arguments: with calibration text, the loss objective
    and loss strategy (the CLI loads causal LMs, which return their next-token loss on ``input_ids``);
    without, output objective and uniform budget."""
    calibrated = args.calibrate > 0
    if args.objective in (None, "auto"):
        args.objective = "loss" if calibrated else "output"
    if args.strategy in (None, "auto"):
        args.strategy = "loss" if calibrated else "uniform"
    if not calibrated and (args.objective == "loss" or args.strategy == "loss"):
        raise UsageError("--strategy loss / --objective loss take loss gradients on calibration text: "
                         "pass --calibrate TOKENS (> 0)")
    if args.calibration_text is not None and not calibrated:
        raise UsageError("--calibration-text was given with --calibrate 0: pass a token count to use it")


def _config(args):
    from ..config import BlastConfig
    return BlastConfig(blocks=args.blocks, strategy=args.strategy, objective=args.objective, method=args.method,
                       iters=args.iters, include=tuple(args.include or ()), exclude=tuple(args.exclude or ()),
                       block_choices=tuple(args.block_choices or ()), allow_dense=not args.blast_only,
                       structure=args.structure, sequential={"on": True, "off": False}.get(args.sequential, "auto"),
                       compute_device=args.compute_device, min_speedup=args.min_speedup, latency=args.latency,
                       factor_dtype=args.factor_dtype,
                       **({"rank_multiple": args.rank_multiple} if args.rank_multiple is not None else {}))


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as stored, each tensor once (tied embeddings are
    one tensor): what the CLI reports, since quantized factors are buffers of one-byte codes and a
    parameter count does not see them."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ---- commands -----------------------------------------------------------------------------------------

def _load(source):
    from .hf import load_causal_lm
    return load_causal_lm(source)


def cmd_analyze(args) -> int:
    from ..analyze import analyze
    model, _ = _load(args.model)
    print(analyze(model))
    return 0


def calibration_batches(args, tok):
    """(batches, description) of ``args.calibrate`` tokens of the calibration text."""
    from .data import split_articles, text_batches
    window = min(CALIBRATION_WINDOW, args.calibrate)
    if args.calibration_text is not None:
        texts, source = [args.calibration_text.read_text(encoding="utf-8")], str(args.calibration_text)
    else:
        texts, source = split_articles()[0], "the gensim wheel's Wikipedia articles (held-out ones excluded)"
    try:
        batches = text_batches(tok, args.calibrate, seq_len=window, texts=texts)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    tokens = sum(b["input_ids"].numel() for b in batches)
    if tokens < args.calibrate - window + 1:
        print(f"warning: {source} has only {tokens} tokens in {window}-token windows; calibrating on those "
              f"(--calibrate {args.calibrate} asked for more)", file=sys.stderr)
    return batches, f"calibrated on {tokens} tokens of {source}"


def cmd_compress(args) -> int:
    from ..build import distributed

    out = Path(args.out)
    resolve_recipe(args)
    check_out(out, args.overwrite)
    config = _config(args)
    if args.calibration_text is None and args.calibrate:
        from .data import wikipedia_file
        wikipedia_file()
    if not args.calibrate:
        print(WEIGHT_ONLY_WARNING, file=sys.stderr)

    with distributed.launched_group():      # under torchrun: the ranks share the fitting
        return _compress_and_save(args, out, config, tok_model=_load(args.model))


def _compress_and_save(args, out, config, tok_model) -> int:
    import shutil

    import torch

    from ..api import WeightOnlyWarning, compress
    from ..build import distributed
    from ..swap import attach_plan

    model, tok = tok_model
    rank, _ = distributed.world()
    before, before_bytes = sum(p.numel() for p in model.parameters()), weight_bytes(model)
    t0 = time.perf_counter()
    calibration, provenance = calibration_batches(args, tok) if args.calibrate else (None, "weight-only (no calibration)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WeightOnlyWarning)      # said above, in the CLI's terms
        compress(model, args.budget, config=config, calibration=calibration)
    if rank != 0:       # every rank holds the same model; the first one saves it
        torch.distributed.barrier()
        return 0
    plan = model.blastfx_plan
    plan.notes.append(provenance)
    attach_plan(model, plan)
    print(plan.summary())
    after, after_bytes = sum(p.numel() for p in model.parameters()), weight_bytes(model)
    print(f"parameters: {before:,} -> {after:,} ({after / before:.1%}); weights: {before_bytes / 2**20:,.1f} MiB -> "
          f"{after_bytes / 2**20:,.1f} MiB ({after_bytes / before_bytes:.1%}) in {time.perf_counter() - t0:.1f}s")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if distributed.world()[1] > 1:
            torch.distributed.barrier()
    print(f"saved to {out}")
    return 0


def cmd_eval(args) -> int:
    from .data import split_articles, wikipedia_file
    from .evaluate import generate_text, perplexity, token_windows, tokens_per_second

    wikipedia_file()
    rows = []
    for source in args.models:
        model, tok = _load(source)
        windows = token_windows(tok, split_articles()[1], args.window, args.max_windows)
        ppl = perplexity(model, windows, progress=True)
        tps = tokens_per_second(model, tok)
        sample = generate_text(model, tok, args.prompt, args.new_tokens)
        rows.append((source, sum(p.numel() for p in model.parameters()), weight_bytes(model), ppl, tps, sample))
    print(f"\nheld-out Wikipedia perplexity ({args.max_windows} x {args.window}-token windows), greedy decode")
    print("| model | params | weights (MiB) | perplexity | tokens/s | sample |\n|---|---|---|---|---|---|")
    for source, params, nbytes, ppl, tps, sample in rows:
        print(f"| {source} | {params:,} | {nbytes / 2**20:,.1f} | {ppl:.2f} | {tps:.1f} | {sample[:80]!r} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..config import OBJECTIVES, STRATEGIES, structure_choices
    from ..structures.blast.quant import formats as factor_formats
    from ..structures import method_names
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    model_help = "a .gguf file or a local HF model folder (config.json and tokenizer files)"

    p = Parser(prog="blastfx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", parents=[common], help="list the linear call sites of a model")
    a.add_argument("model", type=model_source, help=model_help)
    a.set_defaults(fn=cmd_analyze)

    c = sub.add_parser("compress", parents=[common], help="compress a model and save it as an HF folder")
    c.add_argument("model", type=model_source, help=model_help)
    c.add_argument("--budget", type=budget, required=True, help="fraction of compressible parameters kept, in (0, 1)")
    c.add_argument("--out", required=True, help="folder to save the compressed model in (written atomically)")
    c.add_argument("--calibrate", type=count, default=DEFAULT_CALIBRATION_TOKENS, metavar="TOKENS",
                   help=f"calibrate on this many tokens (default {DEFAULT_CALIBRATION_TOKENS}) of the bundled "
                        "non-held-out Wikipedia text or of --calibration-text; 0: weight-only, much worse. More "
                        "pays at low budgets: SmolLM2-135M at 0.5 measured 4.40x dense perplexity with 8192 tokens "
                        "and 2.95x with 65536 (block reconstruction then runs longer too)")
    c.add_argument("--calibration-text", type=text_file, metavar="FILE", help="UTF-8 text to calibrate on")
    c.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="how the budget is spread over layers (default: loss when calibrating, else uniform)")
    c.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="what the calibrated factorization preserves: each layer's outputs, or those weighted "
                        "by their loss Fisher (default: loss when calibrating, else output)")
    c.add_argument("--structure", choices=structure_choices(), default="blast",
                   help="what the layers become: a registered structure (BLAST, the default; SS1; ...), or auto: "
                        "per layer whichever structure, or dense, the measured output error favours")
    c.add_argument("--sequential", choices=("auto", "on", "off"), default="auto", nargs="?", const="on",
                   type=str.lower, help="calibrate block by block on the already-compressed model, with block "
                        "reconstruction (auto, the default: at budgets up to 0.6, where it pays for its time; "
                        "the bare flag: on)")
    c.add_argument("--compute-device", metavar="DEVICE", default=None,
                   help="stream the model through this device (e.g. cuda) one block at a time, the model staying "
                        "on the CPU: for models larger than the GPU; compresses block by block")
    c.add_argument("--min-speedup", type=positive_float, default=None, metavar="X",
                   help="keep dense the layers expected slower than X times dense at decode (see --latency)")
    c.add_argument("--latency", choices=("h200", "measure"), default="h200",
                   help="the decode latency model plans report against: the H200 preset, or measured on this GPU")
    c.add_argument("--blast-only", action="store_true",
                   help="with --strategy error/loss: never keep a layer dense, even where that buys more")
    c.add_argument("--factor-dtype", choices=factor_formats.names(), default=None,
                   help="store BLAST factors U and V as codes of this format with float32 scales, rounded inside the "
                        "calibrated fit (int8: about a quarter of the dense bf16 bytes at --budget 0.5; int4: packed, "
                        "less accurate); the BLAST layers only (--structure blast or auto)")
    c.add_argument("--rank-multiple", type=positive_int, default=None, metavar="N",
                   help="every BLAST rank a multiple of N (default 8; 16 makes a row of int8 codes whole 16-byte "
                        "vectors, 32 of int4, which the decode kernels load fastest)")
    c.add_argument("--blocks", type=positive_int, default=4)
    c.add_argument("--block-choices", type=positive_int, nargs="+", metavar="B",
                   help="let each layer take the block count of least measured error among these (e.g. 4 8)")
    c.add_argument("--method", choices=method_names(), default="als")
    c.add_argument("--iters", type=positive_int, default=None, help="factorization iterations per layer")
    c.add_argument("--include", nargs="*", metavar="PATTERN")
    c.add_argument("--exclude", nargs="*", metavar="PATTERN")
    c.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", parents=[common], help="perplexity, speed and a sample of one or more models")
    e.add_argument("models", nargs="+", type=model_source, metavar="model", help=model_help)
    e.add_argument("--window", type=positive_int, default=512)
    e.add_argument("--max-windows", type=positive_int, default=32)
    e.add_argument("--prompt", default="What is the capital of France?")
    e.add_argument("--new-tokens", type=positive_int, default=30)
    e.set_defaults(fn=cmd_eval)
    return p


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv=None) -> int:
    """Run the CLI; returns the exit code: 0, 2 for bad input, 1 for a failure during the work."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError, ImportError) as err:
        if args.debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.debug:
            raise
        print(f"error: {type(err).__name__}: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
