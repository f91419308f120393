"""Residency: weights on the compute device for a while, then home exactly as they were.

On a CPU-only machine the compute device is "cpu" too; entering always copies, so residency is read
from the storage: a resident tensor's storage is not its home tensor's."""
import pytest
import torch
from torch import nn

from blastfx.streaming import LayerByLayer, Residency, module_tensors


def _block():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    block.register_buffer("scale", torch.ones(8))
    return block


def _addresses(module):
    return {id(t): t.data_ptr() for *_, t in module_tensors([module])}


def test_entering_copies_and_leaving_restores_the_home_storage():
    block = _block()
    home = _addresses(block)
    values = {k: v.clone() for k, v in block.state_dict().items()}
    with Residency([block], "cpu") as r:
        assert all(t.data_ptr() != home[id(t)] for *_, t in module_tensors([block]))
        assert set(r.copies().values()) and len(r.copies()) == len(home)
    assert _addresses(block) == home                         # the original tensors, not copies of them
    assert all(torch.equal(v, values[k]) for k, v in block.state_dict().items())


def test_a_tensor_changed_in_place_goes_home_with_its_new_value_and_the_old_storage_untouched():
    block = _block()
    norm = block[1].weight
    old_home = norm.data
    with Residency([block], "cpu"):
        with torch.no_grad():
            norm.mul_(3)
    assert torch.equal(norm, torch.full((16,), 3.0))
    assert torch.equal(old_home, torch.ones(16))              # the home tensor was never written
    assert norm.data_ptr() != old_home.data_ptr()


def test_a_module_swapped_in_goes_home_and_the_one_swapped_out_gets_its_storage_back():
    block = _block()
    old = block[0]
    home = _addresses(old)
    with Residency([block], "cpu"):
        block[0] = nn.Linear(8, 16)                          # built while resident
        new = block[0]
    assert block[0] is new and new.weight.device.type == "cpu"
    assert _addresses(old) == home


def test_a_tied_weight_moves_once_and_skip_leaves_modules_alone():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False))
    model[2].weight = model[0].weight
    tied, skipped = model[0].weight.data_ptr(), _addresses(model[1])
    with Residency([model], "cpu", skip=[model[1]]) as r:
        assert len(r.copies()) == 1                           # the tied weight, once; nothing of model[1]
        assert model[0].weight.data_ptr() != tied
        assert _addresses(model[1]) == skipped
    assert model[0].weight.data_ptr() == tied


def test_entering_twice_is_an_error_and_leaving_twice_is_harmless():
    block = _block()
    r = Residency([block], "cpu").enter()
    with pytest.raises(RuntimeError, match="already resident"):
        r.enter()
    r.leave()
    r.leave()


def test_layer_by_layer_keeps_one_layer_resident():
    block = _block()
    home = _addresses(block)
    with LayerByLayer(block, "cpu") as layers:
        w0 = layers.get_submodule("0").weight.detach()
        assert block[0].weight.data_ptr() != home[id(block[0].weight)]
        layers.get_submodule("2")
        assert block[0].weight.data_ptr() == home[id(block[0].weight)]      # sent home when the next came
        assert block[2].weight.data_ptr() != home[id(block[2].weight)]
        assert torch.equal(w0, block[0].weight)                              # a weight already read stays valid
    assert _addresses(block) == home
