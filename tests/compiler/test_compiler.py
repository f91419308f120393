"""torch.compile(backend="blast"): equal to eager on CPU (reference path), naive-pattern rewrite,
training, dynamic shapes; CUDA-only checks (marked cuda) skip cleanly without a GPU."""
import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig
from blastfx.compiler import fuse_naive_blast, stats
from blastfx.structures.blast.interop import from_original
import models


class OriginalBlastLinear(nn.Module):
    """The original BLAST release's layer forward (bmm, broadcast mix, bmm), re-typed from its layout."""

    def __init__(self, n, m, b, r):
        super().__init__()
        self.b, self.out_features = b, m
        self.B = nn.Parameter(torch.randn(b, m // b, r) / r ** 0.5)
        self.C = nn.Parameter(torch.randn(b, r, n // b) / (n // b) ** 0.5)
        self.D = nn.Parameter(torch.randn(b, b, r))

    def forward(self, x):
        shape = x.shape
        x = x.flatten(0, -2)
        x = x.view(-1, self.b, x.shape[-1] // self.b).transpose(0, 1)
        y = torch.bmm(x, self.C.transpose(1, 2))
        z = y.unsqueeze(0) * self.D.unsqueeze(2)
        z = z.sum(1)
        out = torch.bmm(z, self.B.transpose(1, 2))
        return out.transpose(0, 1).reshape(*(shape[:-1] + (self.out_features,)))


def test_naive_pattern_is_rewritten_to_the_op():
    torch._dynamo.reset()
    layer = OriginalBlastLinear(32, 24, 4, 6)
    x = torch.randn(2, 5, 32)
    seen = []

    def capture(gm, example_inputs):           # the dynamo graph, as the blast backend receives it
        seen.append(fuse_naive_blast(gm))
        seen.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    out = torch.compile(layer, backend=capture)(x)
    assert seen[0] == 1 and not any(t is torch.bmm for t in seen[1])
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    U, S, V = from_original(layer.B, layer.C, layer.D)
    torch.testing.assert_close(out, blastfx.blast_matmul(x, U, S, V), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lowering", ["extern", "inline"])
def test_backend_fuses_naive_code_and_matches_eager(lowering):
    from blastfx.compiler import lowering as lowering_mod
    torch._dynamo.reset()
    layer = OriginalBlastLinear(32, 24, 4, 6)
    x = torch.randn(3, 32)
    before, inlined = stats["naive_fused"], lowering_mod.stats["inlined"]
    out = torch.compile(layer, backend="blast", options={"lowering": lowering})(x)
    assert stats["naive_fused"] == before + 1
    assert lowering_mod.stats["inlined"] == inlined + (lowering == "inline")
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_compressed_llama_compiles_equal_to_eager():
    torch._dynamo.reset()
    model = blastfx.compress(models.tiny_llama(), 0.5, config=BlastConfig(progress=False))
    x = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model, backend="blast")(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_dit_compiles_equal_to_eager():
    torch._dynamo.reset()
    from blastfx.analyze.capture import example_inputs_for
    model = blastfx.compress(models.tiny_dit(), 0.5, config=BlastConfig(progress=False))
    _, kwargs = example_inputs_for(model)
    with torch.no_grad():
        ref = model(**kwargs).sample
        out = torch.compile(model, backend="blast")(**kwargs).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_training_step_and_dynamic_shapes():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(blastfx.BlastLinear(24, 40, 6, (4, 2)), nn.GELU(), blastfx.BlastLinear(40, 24, 6, (2, 4)))
    compiled_model = nn.Sequential(*[m for m in __import__("copy").deepcopy(eager)])
    compiled = torch.compile(compiled_model, backend="blast", dynamic=True)
    for T in (5, 9):                       # two token counts through one dynamic graph
        x = torch.randn(T, 24)
        eager.zero_grad()
        compiled_model.zero_grad()
        eager(x).pow(2).sum().backward()
        compiled(x).pow(2).sum().backward()
        for a, b in zip(eager.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_backend_rejects_unknown_mode():
    torch._dynamo.reset()
    from blastfx.compiler import blast_backend
    gm = torch.fx.symbolic_trace(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="modes"):
        blast_backend(gm, [torch.randn(2, 4)], mode="warp-speed")


@pytest.mark.cuda
def test_cuda_reduce_overhead_matches_eager():
    torch._dynamo.reset()
    layer = blastfx.BlastLinear(1024, 1024, 256, 4, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    ref = blastfx.blast_matmul_reference(x.float(), layer.U.float(), layer.S.float(), layer.V.float(), layer.bias.float())
    f = torch.compile(layer, backend="blast", mode="reduce-overhead")
    for _ in range(3):
        out = f(x)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def _float64_reference(layer, x):
    return blastfx.blast_matmul_reference(x.double(), layer.U.double(), layer.S.double(), layer.V.double(),
                                          None if layer.bias is None else layer.bias.double(), layer.out_features)


@pytest.mark.parametrize("lowering, inlined", [("inline", True), ("extern", False), ("auto", False)])
def test_lowering_option_inlines_the_op_or_keeps_it(lowering, inlined):
    """inline: the op becomes bmm + fused mix + bmm in Inductor's code (counted by the graph rewrite);
    extern, and auto on CPU: the op stays. Outputs match a float64 reference either way, on a padded,
    biased layer with b_out != b_in."""
    from blastfx.compiler import lowering as lowering_mod
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = blastfx.BlastLinear(30, 21, 5, (3, 4), bias=True)        # 21 = 3 x 7, 30 -> 4 blocks of 8 (padded)
    nn.init.normal_(layer.bias)
    nn.init.normal_(layer.S)
    x = torch.randn(2, 19, 30)
    before = lowering_mod.stats["inlined"]
    with torch.no_grad():
        out = torch.compile(layer, backend="blast", options={"lowering": lowering})(x)
    assert (lowering_mod.stats["inlined"] > before) == inlined
    torch.testing.assert_close(out.double(), _float64_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_inline_lowering_trains_and_handles_dynamic_token_counts():
    from blastfx.compiler import lowering as lowering_mod
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = blastfx.BlastLinear(24, 40, 6, (4, 2), bias=True)
    for p in (layer.S, layer.bias):         # S starts at ones: a mix that mixed up columns would pass
        nn.init.normal_(p)
    compiled = torch.compile(layer, backend="blast", dynamic=True, options={"lowering": "inline"})
    before = lowering_mod.stats["inlined"]
    for T in (5, 33):
        x = torch.randn(T, 24, dtype=torch.float64).float().requires_grad_()
        layer.zero_grad()
        compiled(x).pow(2).sum().backward()
        got = [x.grad] + [p.grad for p in layer.parameters()]
        x64 = x.detach().double().requires_grad_()
        params = [p.detach().double().requires_grad_() for p in (layer.U, layer.S, layer.V, layer.bias)]
        blastfx.blast_matmul_reference(x64, *params, layer.out_features).pow(2).sum().backward()
        for g, ref in zip(got, [x64.grad] + [p.grad for p in params]):
            torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-4)
    assert lowering_mod.stats["inlined"] > before


def test_lowering_option_is_validated():
    torch._dynamo.reset()
    with pytest.raises(Exception, match="lowering must be one of"):
        torch.compile(blastfx.BlastLinear(8, 8, 2, 2), backend="blast", options={"lowering": "magic"})(torch.randn(2, 8))


@pytest.mark.parametrize("tokens, device, dynamic, inline", [(40, "cuda", False, True), (16, "cuda", False, False),
                                                            (40, "cpu", False, False), (40, "cuda", True, False)])
def test_auto_lowering_inlines_only_prefill_sized_calls_on_cuda(tokens, device, dynamic, inline):
    """The "auto" rule, on dynamo graphs whose example values are swapped for fake tensors of the
    device in question (no GPU needed): prefill-sized calls on CUDA inline; decode sizes, CPU and
    unknown (dynamic) token counts keep the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import copy
    from blastfx.compiler.lowering import inline_blast_calls
    torch._dynamo.reset()
    graphs = []
    layer = blastfx.BlastLinear(16, 16, 4, 2)
    torch.compile(layer, backend=lambda gm, ex: graphs.append(gm) or gm.forward, dynamic=dynamic)(torch.randn(tokens, 16))
    gm = graphs[0]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.blastfx.blast_matmul:
            x = node.args[0].meta["example_value"]
            with FakeTensorMode(allow_non_fake_inputs=True, shape_env=getattr(x.fake_mode, "shape_env", None)):
                node.args[0].meta["example_value"] = torch.empty(x.shape, device=device)
    assert inline_blast_calls(copy.deepcopy(gm), "auto") == int(inline)
    assert inline_blast_calls(copy.deepcopy(gm), "extern") == 0
    assert inline_blast_calls(gm, "inline") == 1


def test_inline_after_extern_compile_of_the_same_graph_is_not_served_from_cache():
    """AOTAutograd's cache keys the graph, not the lowering's code: an inline compile must inline."""
    from blastfx.compiler import lowering as lowering_mod
    torch.manual_seed(0)
    layer = blastfx.BlastLinear(16, 12, 4, (3, 2), bias=True)
    nn.init.normal_(layer.S)
    x = torch.randn(7, 16, requires_grad=True)
    for mode in ("extern", "inline"):
        torch._dynamo.reset()
        before = lowering_mod.stats["inlined"]
        out = torch.compile(layer, backend="blast", options={"lowering": mode})(x)
        assert (lowering_mod.stats["inlined"] > before) == (mode == "inline")
        torch.testing.assert_close(out.double(), _float64_reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.requires("transformers")
def test_compile_blocks_compiles_one_graph_per_distinct_block_and_undoes():
    """Regional compilation: decoder blocks share code, so dynamo compiles one graph per distinct set of
    factor shapes (not one per layer); outputs equal eager; undo() restores the eager forwards."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from blastfx.compiler import compile_blocks
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    blastfx.compress(model, 0.5, config=BlastConfig(progress=False))
    x = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    shapes = {tuple(tuple(m.S.shape) for m in layer.modules() if isinstance(m, blastfx.BlastLinear))
              for layer in model.model.layers}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    blocks = compile_blocks(model)
    assert blocks.names == [f"model.layers.{k}" for k in range(4)]
    with torch.no_grad():
        out = model(x, use_cache=False).logits
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == len(shapes)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already overridden"):
        compile_blocks(model)
    assert all("forward" in vars(layer) for layer in model.model.layers)     # the failed call undid nothing of ours
    blocks.undo()
    assert not any("forward" in vars(layer) for layer in model.model.layers)
    with pytest.raises(ValueError, match="no BlastLinear"):
        compile_blocks(models.tiny_llama())


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("dynamic_ranks, graphs_expected", [(False, 3), (None, 2)])
def test_compile_blocks_compiles_every_layer_of_its_own_ranks(dynamic_ranks, graphs_expected):
    """A sensitivity-spread budget gives each layer its own ranks. Static shapes: one graph per layer,
    and with dynamo's limit below the layer count the compiled blocks must run under a raised limit
    rather than let layers run eagerly. Default (dynamic ranks): one specialized graph, then one
    shape-generic graph for all the others. Either way outputs and gradients equal eager, and the
    process-wide limit is never touched: raised only around the blocks' calls."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from blastfx.compiler import compile_blocks
    import torch._dynamo.config as dynamo_config
    torch._dynamo.reset()
    with dynamo_config.patch(recompile_limit=2):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)).eval()
        overrides = {f"model.layers.{k}.mlp.*": {"rank": 4 + 4 * k} for k in range(3)}
        blastfx.compress(model, 0.5, config=BlastConfig(progress=False, overrides=overrides))
        x = torch.randint(3, 128, (2, 11))
        ref = model(x, labels=x, use_cache=False)
        ref.loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        blocks = compile_blocks(model, dynamic_ranks=dynamic_ranks, options={"lowering": "inline"})
        assert dynamo_config.recompile_limit == 2
        out = model(x, labels=x, use_cache=False)
        out.loss.backward()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == graphs_expected
        assert dynamo_config.recompile_limit == 2
        blocks.undo()
        assert dynamo_config.recompile_limit == 2
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6)

