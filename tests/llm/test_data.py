"""Calibration and evaluation text: the news corpus's split, and calibration mixed from several texts."""
from types import SimpleNamespace

import pytest
import torch

from blastfx.llm.data import mixed_batches, news_corpus, split_news
from blastfx.llm.evaluate import token_windows


class ByteTokenizer:
    """One token per byte: enough to cut windows without a model's tokenizer."""
    eos_token = "\n"

    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([list(text.encode("utf-8"))]))


def test_news_halves_are_disjoint_and_evaluation_windows_unchanged():
    fit, heldout = split_news()
    corpus = news_corpus()
    assert heldout + fit == corpus and abs(len(fit) - len(heldout)) <= 1
    tok = ByteTokenizer()
    # the held-out half's windows are the first windows of the whole corpus
    assert torch.equal(token_windows(tok, heldout, 512, 16), token_windows(tok, corpus, 512, 16))


def test_mixed_batches_take_each_share_and_interleave():
    tok = ByteTokenizer()
    a, b = ["a" * 4000], ["b" * 4000]
    batches = mixed_batches(tok, 8 * 64, [(a, 0.75), (b, 0.25)], seq_len=64, batch_size=2)
    ids = torch.cat([batch["input_ids"] for batch in batches])
    assert ids.shape == (8, 64)
    kinds = ["a" if (row == ord("a")).all() else "b" for row in ids]
    assert kinds.count("a") == 6 and kinds.count("b") == 2
    assert kinds[0] == "a" and "b" in kinds[:4]          # both texts early, not one after the other
    only = mixed_batches(tok, 4 * 64, [(a, 1.0), (b, 0.0)], seq_len=64)
    assert all((batch["input_ids"] == ord("a")).all() for batch in only)


@pytest.mark.parametrize("fractions", [(0.5, 0.6), (1.2, -0.2)])
def test_mixed_batches_refuse_fractions_that_are_not_a_split(fractions):
    with pytest.raises(ValueError, match="calibration fractions must be non-negative and sum to 1"):
        mixed_batches(ByteTokenizer(), 512, [(["a" * 2000], fractions[0]), (["b" * 2000], fractions[1])], seq_len=64)
