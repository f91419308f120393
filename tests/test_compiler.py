"""torch.compile(backend="blast"): equal to eager on CPU (reference path), naive-pattern rewrite,
training, dynamic shapes; CUDA-only checks skip cleanly without a GPU."""
import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig
from blastfx.compiler import fuse_naive_blast, stats
from blastfx.interop import from_original
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


def test_backend_fuses_naive_code_and_matches_eager():
    torch._dynamo.reset()
    layer = OriginalBlastLinear(32, 24, 4, 6)
    x = torch.randn(3, 32)
    before = stats["naive_fused"]
    out = torch.compile(layer, backend="blast")(x)
    assert stats["naive_fused"] == before + 1
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
    from blastfx.passes.capture import example_inputs_for
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


def test_kernel_option_validation():
    from blastfx.kernels.dispatch import set_kernels
    with pytest.raises(ValueError, match="kernels"):
        set_kernels("cudnn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reduce_overhead_matches_eager():
    torch._dynamo.reset()
    layer = blastfx.BlastLinear(1024, 1024, 256, 4, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    ref = blastfx.blast_matmul_reference(x.float(), layer.U.float(), layer.S.float(), layer.V.float(), layer.bias.float())
    f = torch.compile(layer, backend="blast", mode="reduce-overhead")
    for _ in range(3):
        out = f(x)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_autotune_option_reaches_the_kernel_settings():
    torch._dynamo.reset()
    from blastfx.kernels import autotune
    layer = blastfx.BlastLinear(16, 12, 4, 2)
    x = torch.randn(3, 16)
    try:
        out = torch.compile(layer, backend="blast", options={"autotune": False})(x)
        assert autotune.settings["enabled"] is False
        torch.testing.assert_close(out, layer(x))
    finally:
        autotune.settings["enabled"] = True
