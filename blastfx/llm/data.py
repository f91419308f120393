"""Real text without a hub: the Wikipedia articles and news corpus shipped in the ``gensim`` wheel.

We only read its data files (gensim is installed with ``--no-deps`` and never imported). Articles are
split deterministically into held-out evaluation articles and the rest (calibration / training), so
evaluation text is never used for fitting.
"""
from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path

import torch

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
HELDOUT_EVERY = 4            # every 4th article (by position) is held out for evaluation


def gensim_data_dir() -> Path:
    """The wheel's ``test_data`` folder; ``BLASTFX_GENSIM_DATA`` points elsewhere (a machine with
    only the data files copied, e.g. a GPU box without the wheel)."""
    override = os.environ.get("BLASTFX_GENSIM_DATA")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the gensim wheel is not installed: pip install --no-deps gensim")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def wikipedia_file() -> Path:
    """The Wikipedia dump inside the wheel, checked to exist: callers that will need the text later
    (the CLI) call this before loading a model, so a missing wheel fails at once, not minutes in."""
    path = gensim_data_dir() / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the gensim wheel (pip install --no-deps gensim) "
                                f"or point BLASTFX_GENSIM_DATA at a folder holding {WIKI_FILE}")
    return path


def _strip_nested(text: str, start: str, end: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(start, i):
            depth += 1
            i += len(start)
        elif depth and text.startswith(end, i):
            depth -= 1
            i += len(end)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Wiki markup -> plain prose (good enough for perplexity; not a full parser)."""
    text = html.unescape(text)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@lru_cache(maxsize=1)
def wikipedia_articles(min_chars: int = 2000) -> tuple[tuple[str, str], ...]:
    """(title, plain text) of the dump's real articles (redirects and stubs dropped), in file order."""
    with bz2.open(wikipedia_file(), "rt", encoding="utf-8") as f:
        raw = f.read()
    articles = []
    for page in re.findall(r"<page>(.*?)</page>", raw, flags=re.S):
        title = re.search(r"<title>(.*?)</title>", page)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if not title or not body or body.group(1).lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(body.group(1))
        if len(text) >= min_chars:
            articles.append((html.unescape(title.group(1)), text))
    return tuple(articles)


def split_articles():
    """(fit, heldout): lists of article texts; every HELDOUT_EVERY-th article is held out."""
    arts = wikipedia_articles()
    heldout = [t for k, (_, t) in enumerate(arts) if k % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    fit = [t for k, (_, t) in enumerate(arts) if k % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return fit, heldout


def news_corpus() -> list[str]:
    """The Lee background news corpus, one article per line."""
    return [line.strip() for line in (gensim_data_dir() / NEWS_FILE).read_text(encoding="latin-1").splitlines()
            if line.strip()]


def split_news() -> tuple[list[str], list[str]]:
    """(fit, heldout) halves of the news corpus by position, the held-out half first: evaluation
    windows are cut from the start of the concatenated text, so they are the windows an evaluation
    of the whole corpus reads (while it needs less than half of it), and calibrating on the fit half
    never sees them."""
    articles = news_corpus()
    half = len(articles) // 2
    return articles[half:], articles[:half]


def mixed_batches(tokenizer, tokens: int, parts, seq_len: int = 512, batch_size: int = 4):
    """Calibration batches drawn from several texts: ``parts`` is [(texts, fraction)], fractions
    summing to 1; each text gives its share of the windows (at least one), and the batches
    interleave them so that any prefix of the calibration covers every domain."""
    if abs(sum(f for _, f in parts) - 1.0) > 1e-9 or any(f < 0 for _, f in parts):
        raise ValueError(f"calibration fractions must be non-negative and sum to 1, got {[f for _, f in parts]}")
    from .evaluate import token_windows
    windows = max(1, tokens // seq_len)
    groups = [token_windows(tokenizer, texts, seq_len, max_windows=max(1, round(windows * f)))
              for texts, f in parts if f > 0]
    order = sorted(((k / len(g), g[k]) for g in groups for k in range(len(g))), key=lambda kw: kw[0])
    stacked = torch.stack([w for _, w in order])
    return [{"input_ids": stacked[i:i + batch_size]} for i in range(0, len(stacked), batch_size)]


def text_batches(tokenizer, tokens: int = 8192, seq_len: int = 512, texts=None, batch_size: int = 4):
    """Calibration batches of ``input_ids`` from text (default: the non-held-out Wikipedia articles)."""
    if texts is None:
        texts = split_articles()[0]
    from .evaluate import token_windows
    windows = token_windows(tokenizer, texts, seq_len, max_windows=max(1, tokens // seq_len))
    return [{"input_ids": windows[i:i + batch_size]} for i in range(0, len(windows), batch_size)]
