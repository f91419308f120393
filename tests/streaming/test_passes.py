"""Streamed whole-model passes: the same outputs and loss gradients as the model in place, with the
non-block modules and at most one block on the compute device at any time.

The compute device is "cpu" here; residency is read from the storage (see test_residency.py)."""
import torch
from torch import nn

import blastfx.streaming.passes as passes
from blastfx.statistics import collect_output_fisher
from blastfx.streaming import StreamedPasses, module_tensors, units
import models


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12)) for _ in range(3))
        self.head = nn.Linear(12, 1)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h).square().mean()          # a scalar: the loss the Fisher pass differentiates


def _homes(model):
    return {id(t): t.data_ptr() for *_, t in module_tensors([model])}


def _resident_blocks(model, homes):
    """Indices of the blocks with a tensor off its home storage."""
    return [k for k, b in enumerate(model.blocks)
            if any(t.data_ptr() != homes[id(t)] for *_, t in module_tensors([b]) if id(t) in homes)]


def test_units_are_the_children_of_the_outermost_containers():
    assert units(Chain()) == ["blocks.0", "blocks.1", "blocks.2"]
    assert units(models.tiny_mlp()) == ["0", "1", "2", "3", "4"]
    assert units(models.tiny_llama()) == ["model.layers.0", "model.layers.1"]


def test_one_block_resident_at_every_layer_call_and_everything_home_after():
    model = Chain().eval()
    x = torch.randn(5, 6)
    expected = model(x)
    homes = _homes(model)
    seen = []

    def spy(module, args):
        head_in = model.head.weight.data_ptr() != homes[id(model.head.weight)]
        seen.append((module, _resident_blocks(model, homes), head_in))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(spy)
    with StreamedPasses(model, "cpu"):
        out = model(x)
    assert torch.equal(out, expected)
    assert len(seen) == 1 + 2 * 3 + 1                  # embed, two layers per block, head
    assert all(rest for _, _, rest in seen)            # embed and head resident for the whole pass
    for module, resident, _ in seen:
        owner = [k for k, b in enumerate(model.blocks) if any(module is m for m in b.modules())]
        assert resident == owner                       # the block being called, and no other
    assert _homes(model) == homes


def test_the_loss_fisher_is_the_same_and_weights_are_saved_by_reference(monkeypatch):
    model = Chain().eval()
    batches = [torch.randn(7, 6) for _ in range(2)]
    names = [f"blocks.{k}.{i}" for k in range(3) for i in (0, 2)]
    expected = collect_output_fisher(model, names, batches)
    homes = _homes(model)
    packed = []
    hooks = torch.autograd.graph.saved_tensors_hooks

    def recording(pack, unpack):
        return hooks(lambda t: packed.append(pack(t)) or packed[-1], unpack)
    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", recording)
    with StreamedPasses(model, "cpu") as streamed, streamed.saved_tensors_at_home():
        got = collect_output_fisher(model, names, batches)
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=0)
    by_reference = {p[1].data_ptr() for p in packed if isinstance(p, tuple) and p[0] == passes._WEIGHT}
    weights = {homes[id(model.get_submodule(n).weight)] for n in names}
    assert weights <= by_reference                     # every block weight saved as its home tensor, not copied
    assert _homes(model) == homes


def test_an_hf_decoder_streams_to_the_same_logits():
    model = models.tiny_llama()
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        homes = {id(t): t.data_ptr() for *_, t in module_tensors([model])}
        with StreamedPasses(model, "cpu"):
            got = model(ids).logits
    assert torch.equal(got, expected)
    assert {id(t): t.data_ptr() for *_, t in module_tensors([model])} == homes
