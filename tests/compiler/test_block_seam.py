"""A block tail and the next block's grouped q/k/v, across the residual add and the next RMSNorm,
rewritten into one ``blastfx::blast_block_seam`` call: the rewritten graph of a compressed HF Llama
computes the eager logits, the op's reference is its parts', and its CUDA kernel's two forms (run
under the interpreter) agree with it."""
import pytest
import torch
import torch.nn.functional as F

import blastfx
import models
from decode_cases import forced_forms
from blastfx.compiler import block_seam, block_tail


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="blast", options={"lowering": "extern", "chain_mlp": "always",
                                                           "chain_norm": "always", "group_siblings": "always",
                                                           **options})


@pytest.mark.parametrize("factor_dtype", [None, "int8"])
def test_every_block_boundary_of_a_compressed_hf_llama_is_rewritten(factor_dtype):
    model = models.compressed_tiny_llama(factor_dtype)
    ids = torch.randint(0, 100, (1, 5))
    seams, tails = block_seam.stats["seams"], block_tail.stats["tails"]
    with torch.no_grad():
        want = model(ids).logits
        got = _compiled(model)(ids).logits
    assert block_seam.stats["seams"] == seams + 1            # two blocks: one boundary
    assert block_tail.stats["tails"] == tails + 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        _compiled(model, chain_norm="never")(ids)
    assert block_seam.stats["seams"] == seams + 1


def _layers(seed=0):
    """o, gate, up, down, then q, k, v of the next block (k and v narrower), as BlastLinear modules."""
    torch.manual_seed(seed)
    shapes = [(48, 48, 16, True), (64, 48, 16, True), (64, 48, 8, False), (48, 64, 16, False),
              (48, 48, 16, True), (16, 48, 8, False), (16, 48, 8, False)]
    return [blastfx.BlastLinear(n, m, r, 4, bias=b).double() for m, n, r, b in shapes]


def _args(layers, a, residual, w, w2):
    d = lambda t: None if t is None else t.detach()             # noqa: E731
    return (a, residual, [d(m.U) for m in layers], [d(m.S) for m in layers], [d(m.V) for m in layers],
            [d(m.bias) for m in layers], [m.out_features for m in layers], w, 1e-6, w2, 1e-5)


def _eager(layers, a, residual, w, w2):
    o, gate, up, down, *heads = layers
    h = residual + o(a)
    h2 = h + down(F.silu(gate(block_tail.rms_norm_reference(h, w, 1e-6))) * up(block_tail.rms_norm_reference(h, w, 1e-6)))
    n2 = block_tail.rms_norm_reference(h2, w2, 1e-5)
    return torch.cat([h2] + [m(n2) for m in heads], dim=-1)


def test_op_reference_opcheck_and_cuda_kernel(monkeypatch):
    layers = _layers()
    g = torch.Generator().manual_seed(1)
    a, residual = (torch.randn(2, 1, 48, generator=g, dtype=torch.float64) for _ in range(2))
    w, w2 = (1 + 0.2 * torch.randn(48, generator=g, dtype=torch.float64) for _ in range(2))
    args = _args(layers, a, residual, w, w2)
    with torch.no_grad():
        want = _eager(layers, a, residual, w, w2)
        torch.testing.assert_close(torch.ops.blastfx.blast_block_seam(*args), want)
        torch.library.opcheck(torch.ops.blastfx.blast_block_seam.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        for _ in forced_forms(monkeypatch, ("seam", "parts")):
            torch.testing.assert_close(block_seam._cuda_kernel(*args), want, rtol=1e-4, atol=1e-5)   # fp32 sums
    with pytest.raises(ValueError, match="six or seven layers"):
        torch.ops.blastfx.blast_block_seam(a, residual, *(x[:5] for x in args[2:7]), *args[7:])
    with pytest.raises(ValueError, match=r"the next norm weight must be \(48,\)"):
        torch.ops.blastfx.blast_block_seam(*args[:9], w2[:40], 1e-5)


def test_quantized_op_reference_and_cuda_kernel(monkeypatch):
    """Codes in all seven layers: the op's reference is the eager layers', and its CUDA kernel's two
    forms agree with it."""
    from blastfx.structures.blast.quant import quantize_layer
    layers = [quantize_layer(m.float(), "int8") for m in _layers(3)]
    g = torch.Generator().manual_seed(2)
    a, residual = (torch.randn(3, 48, generator=g) for _ in range(2))
    w, w2 = (1 + 0.2 * torch.randn(48, generator=g) for _ in range(2))
    d = lambda t: None if t is None else t.detach()             # noqa: E731
    args = (a, residual, [m.U for m in layers], [m.U_scale for m in layers], [d(m.S) for m in layers],
            [m.V for m in layers], [m.V_scale for m in layers], [d(m.bias) for m in layers],
            [m.out_features for m in layers], w, 1e-6, w2, 1e-5)
    with torch.no_grad():
        want = _eager(layers, a, residual, w, w2)
        torch.testing.assert_close(torch.ops.blastfx.blast_block_seam_quantized(*args), want, rtol=1e-5, atol=1e-5)
        torch.library.opcheck(torch.ops.blastfx.blast_block_seam_quantized.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        for _ in forced_forms(monkeypatch, ("seam", "parts")):
            torch.testing.assert_close(block_seam._cuda_kernel_quantized(*args), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_decoder_families_are_rewritten(family):
    """Mistral and Qwen2 (q/k/v with biases) write their norms and MLPs as Llama does: three blocks give
    three tails and two seams, with the eager logits."""
    import transformers
    classes = {"mistral": ("MistralConfig", "MistralForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, name) for name in classes[family])
    torch.manual_seed(0)
    model = model_cls(config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)).eval()
    blastfx.compress(model, 0.5, config=blastfx.BlastConfig(init="random", progress=False))
    ids = torch.randint(0, 100, (1, 5))
    seams, tails = block_seam.stats["seams"], block_tail.stats["tails"]
    with torch.no_grad():
        want = model(ids).logits
        got = _compiled(model)(ids).logits
    assert (block_tail.stats["tails"] - tails, block_seam.stats["seams"] - seams) == (3, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
