"""LoRA with peft on a compressed model: targets, training, exact merge."""
import copy
import warnings

import pytest
import torch

import blastfx
import models
from blastfx import BlastConfig, BlastLinear
from conftest import dense_from_blocks

pytestmark = pytest.mark.requires("transformers", "peft")


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blastfx.WeightOnlyWarning)
        model = blastfx.compress(models.tiny_llama(), 0.5, config=BlastConfig(progress=False))
    return model, torch.randint(3, 128, (2, 9))


def lora(model, targets, **kwargs):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kwargs))


def blast_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, BlastLinear)}


def test_named_targets_wrap_blast_layers(compressed):
    from blastfx.integrations.peft import BlastLoraLinear

    model, x = compressed
    peft_model = lora(model, ["q_proj", "v_proj"])
    wrapped = {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, BlastLoraLinear)}
    assert wrapped == {n for n in blast_names(model) if n.endswith(("q_proj", "v_proj"))} and len(wrapped) == 4
    with torch.no_grad():                      # LoRA starts at B = 0: the output is the compressed model's
        assert torch.equal(peft_model(x).logits, model(x).logits)


def test_all_linear_includes_blast_layers(compressed):
    from blastfx.integrations.peft import BlastLoraLinear

    model, _ = compressed
    peft_model = lora(model, "all-linear")
    wrapped = {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, BlastLoraLinear)}
    assert wrapped == blast_names(model) and len(wrapped) == 14
    assert not isinstance(peft_model.base_model.model.lm_head, BlastLoraLinear)       # the head stays out, as for nn.Linear


def test_training_moves_only_the_adapters(compressed):
    model, x = compressed
    peft_model = lora(model, ["q_proj", "v_proj"])
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    assert all(not m.U.requires_grad for m in peft_model.modules() if isinstance(m, BlastLinear))


def _adapted(model):
    """LoRA on q/v with the B matrices set away from their zero init (as training would)."""
    peft_model = lora(model, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    return peft_model.eval()


def test_merge_is_exact_and_saves_as_a_compressed_model(compressed, tmp_path):
    from transformers import AutoModelForCausalLM

    model, x = compressed
    peft_model = _adapted(model)
    wrapper = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    base = wrapper.get_base_layer()
    W = dense_from_blocks(base.U, base.S, base.V, base.out_features, base.in_features)
    delta = (wrapper.lora_B["default"].weight.double() @ wrapper.lora_A["default"].weight.double()) * wrapper.scaling["default"]
    assert delta.abs().max() > 1e-2
    with torch.no_grad():
        ref = peft_model(x).logits
    merged = peft_model.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BlastLinear) and layer.rank == base.rank    # the merged layer, rank r + 4
    assert layer.rank == model.model.layers[0].self_attn.q_proj.rank + 4
    merged_W = dense_from_blocks(layer.U, layer.S, layer.V, layer.out_features, layer.in_features)
    assert (merged_W - (W + delta)).abs().max() < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ref, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path)                # the plan on disk has the merged ranks
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[0].self_attn.q_proj.rank == layer.rank
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, merged(x).logits)


def test_unmerge_restores_the_factors_exactly(compressed):
    model, x = compressed
    peft_model = _adapted(model)
    wrapper = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    factors = [t.detach().clone() for t in (wrapper.base_layer.U, wrapper.base_layer.S, wrapper.base_layer.V)]
    with torch.no_grad():
        ref = peft_model(x).logits
    wrapper.merge()
    assert wrapper.base_layer.rank == factors[0].shape[-1] + 4
    wrapper.unmerge()
    assert all(torch.equal(a, b) for a, b in zip(factors, (wrapper.base_layer.U, wrapper.base_layer.S,
                                                            wrapper.base_layer.V)))
    with torch.no_grad():
        assert torch.equal(peft_model(x).logits, ref)


def test_variants_needing_a_dense_weight_are_refused(compressed):
    model, _ = compressed
    with pytest.raises(ValueError, match="use_dora is not available on BLAST layers"):
        lora(model, ["q_proj"], use_dora=True)
    with pytest.raises(AttributeError, match="no dense .weight"):
        lora(model, ["q_proj"], init_lora_weights="pissa")


def test_merging_into_quantized_layers_is_refused_before_anything_merges():
    """A model mixing float and quantized BLAST layers: ``merge_and_unload`` and ``merge_adapter`` refuse
    up front, naming a quantized layer, and every layer is left wrapped and unmerged with its factors
    and outputs as before (peft merges layer by layer, so a per-layer refusal came too late)."""
    from blastfx import LayerOverride

    torch.manual_seed(0)
    float_q = "model.layers.0.self_attn.q_proj"
    model = blastfx.compress(models.tiny_llama(), 0.5, calibration=torch.randint(3, 128, (4, 16)),
                             config=BlastConfig(progress=False, factor_dtype="int8",
                                                overrides={float_q: LayerOverride(factor_dtype="model")}))
    x = torch.randint(3, 128, (2, 9))
    peft_model = lora(model, ["q_proj", "v_proj"], init_lora_weights=False)
    inner = peft_model.base_model.model
    float_rank = inner.get_submodule(float_q).get_base_layer().rank
    assert inner.get_submodule(float_q).get_base_layer().factor_dtype is None
    assert any(isinstance(m, BlastLinear) and m.factor_dtype == "int8" for m in inner.modules())
    with torch.no_grad():
        ref = peft_model(x).logits
    for merge in (lambda: peft_model.merge_and_unload(), lambda: peft_model.merge_adapter(),
                  lambda: peft_model.merge_adapter(["default"])):
        with pytest.raises(ValueError, match=r"cannot merge LoRA into 'model\.layers\.\d\.self_attn\.[qv]_proj'"
                                             r"( and \d+ more)?: .* nothing was merged"):
            merge()
        wrapper = inner.get_submodule(float_q)
        assert not wrapper.merged and wrapper.get_base_layer().rank == float_rank
        with torch.no_grad():
            assert torch.equal(peft_model(x).logits, ref)
