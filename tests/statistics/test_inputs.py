"""What compress(calibration=...) accepts: batches, a 2-D tensor of token ids, texts with tokenizer=;
anything else a clear error before the model is touched."""
import copy

import pytest
import torch

import blastfx
import blastfx.statistics.inputs as cd
from blastfx import BlastConfig, BlastLinear
from blastfx.statistics.inputs import calibration_batches, text_rows
import models


class CharTokenizer:
    """A tokenizer with a known answer: one token per character, its code point."""
    eos_token = "|"
    model_max_length = 10 ** 30          # what HF tokenizers say when they have no limit

    def __call__(self, text, return_tensors=None):
        assert return_tensors == "pt"
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}


def test_token_ids_become_input_ids_batches_for_hf_models_and_plain_tensors_otherwise(monkeypatch):
    monkeypatch.setattr(cd, "BATCH_TOKENS", 64)                    # 4 rows of 16 per batch
    ids = torch.randint(3, 128, (10, 16))
    batches = calibration_batches(models.tiny_llama(), ids)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ids)
    plain = calibration_batches(torch.nn.Embedding(128, 8), ids)
    assert [b.shape for b in plain] == [(4, 16), (4, 16), (2, 16)] and torch.equal(torch.cat(plain), ids)


def test_texts_are_joined_with_eos_and_cut_into_rows(monkeypatch):
    monkeypatch.setattr(cd, "TEXT_SEQ_LEN", 3)
    rows = text_rows(torch.nn.Linear(2, 2), ["abc", "de"], CharTokenizer())
    assert rows.tolist() == [[ord(c) for c in "abc"], [ord(c) for c in "|de"]]     # the last "|" is left over
    monkeypatch.setattr(cd, "TEXT_SEQ_LEN", 512)
    short = text_rows(torch.nn.Linear(2, 2), ["hello"], CharTokenizer())          # fewer tokens than a row
    assert short.tolist() == [[ord(c) for c in "hello|"]]
    gpt2 = models.tiny_gpt2()                                                     # 64 positions
    assert text_rows(gpt2, ["x" * 200], CharTokenizer()).shape == (3, 64)


def test_compress_takes_token_ids_and_texts_as_it_takes_the_batches(monkeypatch):
    """The old code iterated a 2-D tensor row by row and failed inside attention."""
    monkeypatch.setattr(cd, "TEXT_SEQ_LEN", 32)
    dense = models.tiny_llama()
    text = "".join(chr(c) for c in torch.randint(40, 120, (95,), generator=torch.Generator().manual_seed(0)))
    ids = torch.tensor([[ord(c) for c in text + "|"]]).view(3, 32)
    cfg = BlastConfig(objective="output", strategy="uniform", include="*.mlp.down_proj", iters=2, progress=False)
    results = []
    for calibration, tokenizer in ((ids, None), ([text], CharTokenizer()), ([{"input_ids": ids}], None)):
        m = copy.deepcopy(dense)
        blastfx.compress(m, 0.5, config=cfg, calibration=calibration, tokenizer=tokenizer)
        results.append(m.state_dict())
    assert any(isinstance(x, BlastLinear) for x in m.modules())
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for k in other:
            torch.testing.assert_close(other[k], results[0][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("calibration,tokenizer,error,match", [
    ("some text", None, TypeError, "one str; pass a list of texts with tokenizer="),
    ({"input_ids": torch.ones(2, 4, dtype=torch.long)}, None, TypeError, r"one dict; pass a list of batches"),
    (["a", "b"], None, TypeError, "list of texts .2.: pass tokenizer="),
    ([torch.ones(2, 4)], CharTokenizer(), ValueError, "tokenizer= is only used with calibration texts"),
    (torch.ones(2, 4, dtype=torch.long), CharTokenizer(), ValueError, "tokenizer= is only used"),
    (torch.randn(8, 48), None, ValueError, r"token ids, an integer tensor \(rows, seq\); got a torch.float32 "
                                           r"tensor of shape \(8, 48\)"),
    (torch.ones(16, dtype=torch.long), None, ValueError, r"shape \(16,\)"),
    (torch.ones(0, 4, dtype=torch.long), None, ValueError, "empty tensor"),
    ([], None, ValueError, "calibration is empty"),
    (42, None, TypeError, "got int"),
    ([torch.ones(2, 48), 3.5], None, TypeError, r"calibration\[1\] is a float"),
    ([torch.ones(2, 48), "text"], None, TypeError, r"calibration\[1\] is a str among other batches"),
    (None, CharTokenizer(), ValueError, "calibration= is not given"),
    (list(torch.ones(3, 8, dtype=torch.long)), None, ValueError, r"calibration\[0\] is a 1-D integer tensor"),
    (["text"], "not a tokenizer", TypeError, "tokenizer must be a callable"),
])
def test_anything_else_is_a_clear_error_and_the_model_is_untouched(calibration, tokenizer, error, match):
    model = models.tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        blastfx.compress(model, 0.5, config=BlastConfig(include=("*",), progress=False), calibration=calibration,
                         tokenizer=tokenizer)
    assert not any(isinstance(m, BlastLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "blastfx_plan")
