"""blastfx.inference_options(): CUDA graphs and no dynamo guards on nn modules, for a model that is
served as it is. Outputs equal eager, through torch.compile and through HF generate's compile; the
price (no re-check of module attributes) is what the docstring says, and bad input is refused."""
import pytest
import torch

import blastfx
from blastfx import BlastConfig
from blastfx.compiler import inference_options
import models


def _compressed_llama():
    torch.manual_seed(0)
    model = models.tiny_llama()
    blastfx.compress(model, 0.5, config=BlastConfig(init="random", progress=False))
    return model


def test_options_and_the_lazy_package_attribute():
    opts = inference_options()
    assert opts["triton.cudagraphs"] is True
    assert opts["guard_filter_fn"] is torch.compiler.skip_guard_on_all_nn_modules_unsafe
    assert inference_options(cudagraphs=False, lowering="extern") == {
        "triton.cudagraphs": False, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        "lowering": "extern"}
    assert blastfx.inference_options is inference_options
    assert "inference_options" in dir(blastfx)
    with pytest.raises(AttributeError, match="no attribute 'inference_option'"):
        blastfx.inference_option
    with pytest.raises(ValueError, match="not a mode"):
        inference_options(mode="reduce-overhead")


@pytest.mark.parametrize("options", [None, "inference"])
def test_compiled_model_equals_eager_and_module_guards_follow_the_options(options):
    """Same logits as eager; in-place new parameter values are used without a recompile either way.
    A changed module attribute recompiles under the default guards, and is not re-checked (no new
    graph) with the module guards skipped."""
    torch._dynamo.reset()
    model = _compressed_llama()
    x = torch.randint(3, 128, (2, 7))
    compiled = torch.compile(model, backend="blast", options=inference_options() if options else None)
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
        torch.testing.assert_close(compiled(x, use_cache=False).logits, ref, rtol=1e-4, atol=1e-5)
        for p in model.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(compiled(x, use_cache=False).logits, model(x, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-5)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        model.model.layers[0].self_attn.training = True               # read by the traced attention
        compiled(x, use_cache=False)
    new_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    assert new_graphs == (0 if options else 1)


@pytest.mark.requires("transformers")
def test_hf_generate_compiles_with_the_options_and_matches_eager():
    from transformers import CompileConfig, GenerationConfig
    torch._dynamo.reset()
    model = _compressed_llama()
    ids = torch.randint(3, 128, (1, 5))
    compile_config = CompileConfig(backend="blast", fullgraph=True, dynamic=False, mode=None,
                                   options=inference_options())
    compile_config._compile_all_devices = True         # generate compiles only on accelerators otherwise
    common = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=0)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        compiled = model.generate(ids, generation_config=GenerationConfig(**common, compile_config=compile_config))
        eager = model.generate(ids, generation_config=GenerationConfig(**common, disable_compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    assert torch.equal(compiled, eager)
