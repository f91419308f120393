"""Weights that stay on disk: a model built on the meta device, its tensors memory-mapped from a
safetensors file, compresses in streaming mode to the same model as the one built in memory."""
import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import blastfx
from blastfx import BlastConfig
from blastfx.streaming import attach_safetensors
import models


def _on_meta(dense):
    """``dense``'s architecture built on the meta device, its non-persistent rotary buffer on the CPU
    (a checkpoint does not hold it)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(dense.config).eval()
    model.model.rotary_emb = LlamaRotaryEmbedding(config=dense.config)
    return model


def test_a_model_on_disk_compresses_to_the_same_model_as_in_memory(tmp_path):
    dense = models.tiny_llama()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, tmp_path / "model.safetensors")
    model = attach_safetensors(_on_meta(dense), tmp_path)
    assert not any(t.is_meta for t in model.state_dict().values())
    batches = [{"input_ids": torch.randint(3, 128, (2, 16))} for _ in range(3)]
    results = []
    for m, device in ((copy.deepcopy(dense), None), (model, "cpu")):
        torch.manual_seed(1)
        config = BlastConfig(progress=False, sequential=True, reconstruct_steps=4, compute_device=device)
        results.append(blastfx.compress(m, 0.5, config=config, calibration=batches).state_dict())
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_a_missing_or_mismatched_tensor_is_an_error_and_leaves_the_model_on_meta(tmp_path):
    dense = models.tiny_llama()
    state = {k: v.contiguous() for k, v in dense.state_dict().items()}
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "a.safetensors")
    model = _on_meta(dense)
    with pytest.raises(ValueError, match="'lm_head.weight' is on the meta device and in none of the 1 safetensors"):
        attach_safetensors(model, tmp_path / "a.safetensors")
    assert model.lm_head.weight.is_meta and model.model.embed_tokens.weight.is_meta
    save_file({"lm_head.weight": state["lm_head.weight"].half()}, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="'lm_head.weight': the file holds torch.float16"):
        attach_safetensors(model, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert all(t.is_meta for n, t in model.state_dict().items())
    with pytest.raises(ValueError, match="does not exist"):
        attach_safetensors(model, tmp_path / "nothing.safetensors")


def _mapped_ranges(path):
    """The address ranges at which this process maps ``path`` (Linux /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                start, end = line.split()[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


def test_attached_tensors_are_the_files_memory_map_and_keep_their_parameter_objects(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    params = list(model.parameters())
    values = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3), "1.weight": torch.randn(2, 3),
              "1.bias": torch.randn(2)}
    save_file(values, tmp_path / "m.safetensors")
    attach_safetensors(model, tmp_path / "m.safetensors")
    assert all(a is b for a, b in zip(model.parameters(), params)) and all(isinstance(p, nn.Parameter) for p in params)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in values.items())
    ranges = _mapped_ranges((tmp_path / "m.safetensors").resolve())
    assert all(any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in params)     # read from the file, not copied


def test_streaming_a_model_still_on_meta_is_refused_naming_a_tensor():
    dense = models.tiny_llama()
    model = _on_meta(dense)
    config = BlastConfig(progress=False, sequential=True, compute_device="cpu")
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' \(and \d+ more\) is on the meta device"):
        blastfx.compress(model, 0.5, config=config, calibration=[{"input_ids": torch.randint(3, 128, (2, 16))}])
    assert all(t.is_meta for n, t in model.state_dict().items())
