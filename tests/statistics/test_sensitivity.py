"""Block counts chosen per layer from measured error (BlastConfig.block_choices)."""
import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig
from blastfx.statistics.sensitivity import block_errors
from conftest import dense_from_blocks


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(64, 64, bias=False),
                                                    "b": nn.Linear(64, 64, bias=False)}) for _ in range(2)])

    def forward(self, x):
        for block in self.layers:
            x = block["b"](block["a"](x))
        return x


def _structured_model():
    """Known answer: every "a" weight is exactly BLAST with 4x4 blocks and rank 8 (8 x (64 + 64 + 16)
    = 1152 parameters); every "b" weight is exactly rank 9 (as BLAST with b = 1: 9 x 129 = 1161). At
    1200/4096 of the parameters b = 4 gets rank 8 and b = 1 rank 9: each structure fits one choice only."""
    torch.manual_seed(0)
    model = TwoLayers()
    with torch.no_grad():
        for block in model.layers:
            U, S, V = torch.randn(4, 16, 8), torch.randn(4, 4, 8), torch.randn(4, 16, 8)
            block["a"].weight.copy_(dense_from_blocks(U, S, V, 64, 64))
            block["b"].weight.copy_(torch.randn(64, 9) @ torch.randn(9, 64) / 8)
    return model


CONFIG = dict(rank_multiple=1, progress=False, min_features=8, probe_iters=20)
BUDGET = 1200 / 4096


def test_each_layer_takes_the_block_count_its_structure_needs():
    model = _structured_model()
    config = BlastConfig(block_choices=(1, 4), **CONFIG)
    plan = blastfx.plan_for(model, BUDGET, config)
    for k in range(2):
        assert plan.layers[f"layers.{k}.a"].blocks == (4, 4) and plan.layers[f"layers.{k}.a"].rank >= 8
        assert plan.layers[f"layers.{k}.b"].blocks == (1, 1) and plan.layers[f"layers.{k}.b"].rank >= 9
    assert any("blocks chosen per layer by measured weight error" in note for note in plan.notes)
    errors = block_errors(model, blastfx.plan_for(model, BUDGET, BlastConfig(**CONFIG)), config)
    assert errors["layers.0.a"][(4, 4)] < errors["layers.0.a"][(1, 1)]
    assert errors["layers.0.b"][(1, 1)] < 1e-4 < errors["layers.0.b"][(4, 4)]


def test_chosen_blocks_beat_either_uniform_choice_on_the_output():
    x = torch.randn(7, 64, dtype=torch.float64)
    ref = _structured_model().double()(x)

    def output_error(**kwargs):
        model = blastfx.compress(_structured_model(), BUDGET, config=BlastConfig(**CONFIG, **kwargs))
        return ((model.double()(x) - ref).norm() / ref.norm()).item()

    chosen = output_error(block_choices=(1, 4))
    assert chosen < 0.8 * min(output_error(blocks=1), output_error(blocks=4))


@pytest.mark.parametrize("kwargs, message", [(dict(block_choices=(4,)), "at least two"),
                                             (dict(block_choices=(4, 0)), "block"),
                                             (dict(probe_iters=0), "probe_iters")])
def test_block_choice_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlastConfig(**kwargs)
