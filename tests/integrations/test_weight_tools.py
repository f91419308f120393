"""Tools that expect a dense ``.weight`` meet a BLAST layer: a clear error, never a silent dense copy;
and the exact low-rank update LoRA merging relies on."""
import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastLinear
from conftest import dense_from_blocks


def test_weight_access_raises_a_message_naming_blast_and_the_alternatives():
    layer = BlastLinear(48, 40, 8, (2, 3))
    with pytest.raises(AttributeError) as err:
        layer.weight  # noqa: B018
    message = str(err.value)
    assert "BLAST" in message and "to_dense()" in message and "before blastfx.compress" in message
    assert not hasattr(layer, "weight")            # probing tools see a module without a weight
    assert isinstance(layer.U, nn.Parameter)       # every other attribute is found as before
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        layer.nonexistent  # noqa: B018


def _quantize_like_torchao(model, filter_fn=None):
    """torchao's ``quantize_`` access pattern: modules passing the filter (by default nn.Linear with a
    weight) get their ``.weight`` read and replaced."""
    filter_fn = filter_fn or (lambda m, fqn: isinstance(m, nn.Linear) and hasattr(m, "weight"))
    done = []
    for fqn, module in model.named_modules():
        if filter_fn(module, fqn):
            module.weight = nn.Parameter(module.weight.detach().round(), requires_grad=False)
            done.append(fqn)
    return done


def test_weight_quantization_passes_leave_blast_layers_or_fail_clearly():
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 48))
    blastfx.compress(model, 0.5, config=blastfx.BlastConfig(include=("2",), init="random", progress=False))
    assert isinstance(model[2], BlastLinear) and not isinstance(model[0], BlastLinear)
    assert _quantize_like_torchao(model) == ["0", "4"]     # the default filter: dense layers only
    with pytest.raises(AttributeError, match="BLAST"):
        _quantize_like_torchao(model, lambda m, fqn: isinstance(m, (nn.Linear, BlastLinear)))


def test_real_torchao_quantize_on_a_blast_layer_refuses_and_changes_nothing():
    """torchao's default filter passes BLAST layers by (they are no nn.Linear); one that selects them
    is refused before anything is rewritten: our AttributeError naming BLAST where torchao reads
    ``.weight``, torchao's own check for a weight attribute where it probes with ``hasattr`` first."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    model = nn.Sequential(BlastLinear(64, 64, 8, (2, 2)), nn.Linear(64, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((AttributeError, AssertionError), match="weight"):
        quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False),
                  filter_fn=lambda m, fqn: isinstance(m, BlastLinear))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model[0], BlastLinear)
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False))      # default filter: the dense layer only
    assert type(model[1].weight).__name__ == "Int8Tensor"
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in ("0.U", "0.S", "0.V"))


@pytest.mark.parametrize("shape", [(40, 48, (2, 3)), (37, 50, (4, 4))])     # exact blocks, and padded ones
def test_add_low_rank_is_exact_and_remove_rank_undoes_it(shape):
    m, n, blocks = shape
    layer = BlastLinear(n, m, 6, blocks, dtype=torch.float64)
    before = dense_from_blocks(layer.U, layer.S, layer.V, m, n)
    factors = [t.detach().clone() for t in (layer.U, layer.S, layer.V)]
    B, A = torch.randn(m, 3, dtype=torch.float64), torch.randn(3, n, dtype=torch.float64)
    x = torch.randn(5, n, dtype=torch.float64)
    layer.add_low_rank_(B, A)
    assert layer.rank == 9
    layer.check_padding()
    assert (dense_from_blocks(layer.U, layer.S, layer.V, m, n) - (before + B @ A)).abs().max() < 1e-12
    with torch.no_grad():
        assert (layer(x) - x @ (before + B @ A).T - layer.bias).abs().max() < 1e-12
    layer.remove_rank_(3)
    assert all(torch.equal(a, b) for a, b in zip(factors, (layer.U, layer.S, layer.V)))
    with pytest.raises(ValueError, match="B"):
        layer.add_low_rank_(torch.randn(m + 1, 2), torch.randn(2, n))
    with pytest.raises(ValueError, match="k must be"):
        layer.remove_rank_(6)
    with pytest.raises(ValueError, match="dense layer would be smaller"):
        layer.add_low_rank_(torch.randn(m, 200), torch.randn(200, n))
    assert layer.rank == 6
