"""Block-wise reconstruction inside sequential calibration: compress(..., sequential=True)."""
import copy

import pytest
import torch

import blastfx
import blastfx.sequential as seq
from blastfx import BlastConfig
import models


def block_errors64(model, dense, batches):
    """Per decoder block: relative error of its outputs against the dense model's, both run in float64
    on the same batches (each model on its own stream, as the model really runs)."""
    outs = {}
    for key, m in (("c", copy.deepcopy(model).double()), ("d", copy.deepcopy(dense).double())):
        hooks = [layer.register_forward_hook(lambda mod, a, o, i=i, key=key: outs.setdefault((key, i), []).append(
                 (o[0] if isinstance(o, tuple) else o).detach()))
                 for i, layer in enumerate(m.model.layers)]
        with torch.no_grad():
            for b in batches:
                m(b)
        for h in hooks:
            h.remove()
    n = len(model.model.layers)
    return [(sum((c - d).square().sum() for c, d in zip(outs["c", i], outs["d", i]))
             / sum(d.square().sum() for d in outs["d", i])).sqrt().item() for i in range(n)]


def compressed(dense, batches, **config):
    m = copy.deepcopy(dense)
    blastfx.compress(m, 0.4, config=BlastConfig(progress=False, sequential=True, **config), calibration=batches)
    return m


def test_reconstruction_lowers_every_blocks_output_error():
    torch.manual_seed(0)
    dense = models.tiny_llama().eval()
    batches = [torch.randint(3, 128, (4, 32)) for _ in range(6)]
    plain = compressed(dense, batches, reconstruct_steps=0)
    rec = compressed(dense, batches, reconstruct_steps=60, reconstruct_lr=3e-3)
    note = [n for n in rec.blastfx_plan.notes if n.startswith("reconstruction:")]
    assert note and "2 of 2 blocks improved" in note[0]
    assert not any(n.startswith("reconstruction:") for n in plain.blastfx_plan.notes)
    e_plain, e_rec = block_errors64(plain, dense, batches), block_errors64(rec, dense, batches)
    assert all(r < 0.9 * p for r, p in zip(e_rec, e_plain)), (e_plain, e_rec)
    held_out = [torch.randint(3, 128, (4, 32)) for _ in range(2)]
    assert block_errors64(rec, dense, held_out)[-1] < block_errors64(plain, dense, held_out)[-1]


def test_norms_train_only_when_asked():
    torch.manual_seed(0)
    dense = models.tiny_llama().eval()
    batches = [torch.randint(3, 128, (2, 16)) for _ in range(2)]
    norms = lambda m: {k: v for k, v in m.state_dict().items() if "norm" in k}     # noqa: E731
    frozen = compressed(dense, batches, reconstruct_steps=5, reconstruct_lr=1e-3, reconstruct_norms=False)
    assert all(torch.equal(v, norms(dense)[k]) for k, v in norms(frozen).items())
    trained = compressed(dense, batches, reconstruct_steps=5, reconstruct_lr=1e-3)
    assert any(not torch.equal(v, norms(dense)[k]) for k, v in norms(trained).items() if ".layers." in k)


@pytest.mark.parametrize("error", [RuntimeError("reconstruction failed"), KeyboardInterrupt()])
def test_failure_in_a_later_block_restores_the_model(monkeypatch, error):
    torch.manual_seed(0)
    model = models.tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = []
    real = seq.reconstruct_block

    def failing(block, *args, **kwargs):
        if done:
            raise error
        result = real(block, *args, **kwargs)
        done.append(result)
        assert result.kept
        assert any(not torch.equal(p, before[f"model.layers.0.{n}"]) for n, p in block.named_parameters()
                   if "norm" in n)                      # block 0's norms really changed before the failure
        return result
    monkeypatch.setattr(seq, "reconstruct_block", failing)
    with pytest.raises(type(error)):
        blastfx.compress(model, 0.4, config=BlastConfig(progress=False, sequential=True, reconstruct_steps=10,
                                                         reconstruct_lr=1e-3),
                         calibration=[torch.randint(3, 128, (4, 32)) for _ in range(2)])
    assert done
    assert not any(isinstance(m, blastfx.BlastLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("field, value", [("reconstruct_steps", -1), ("reconstruct_steps", 1.5),
                                          ("reconstruct_seconds", 0), ("reconstruct_lr", -1e-3),
                                          ("reconstruct_norms", "no")])
def test_bad_reconstruction_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        BlastConfig(**{field: value})


def test_quantized_layers_are_reconstructed_in_float_then_rounded_and_reconstructed_again(monkeypatch):
    """Codes have no gradient: a block of quantized layers would reconstruct its S alone. So each
    block's planned-quantized layers are built and reconstructed with float factors, rounded with
    their fit's objective (their input covariance), and the block reconstructed once more around the
    codes; the model ends with codes everywhere the plan asks and stays near the float model."""
    import blastfx.structures.blast.quant as quant
    torch.manual_seed(0)
    dense = models.tiny_llama().eval()
    batches = [torch.randint(3, 128, (4, 32)) for _ in range(4)]
    seen, rounded = [], []
    real_fit, real_round = seq.reconstruct_block, quant.quantize_layer

    def fit(block, *args, **kwargs):
        seen.append(sorted({m.factor_dtype for m in block.modules() if isinstance(m, blastfx.BlastLinear)},
                           key=str))
        return real_fit(block, *args, **kwargs)

    def round_layer(layer, fmt, *args, calibration=None, **kwargs):
        rounded.append((layer.factor_dtype, fmt, tuple(calibration.shape), layer.in_features))
        return real_round(layer, fmt, *args, calibration=calibration, **kwargs)

    monkeypatch.setattr(seq, "reconstruct_block", fit)
    monkeypatch.setattr(quant, "quantize_layer", round_layer)
    model = compressed(dense, batches, reconstruct_steps=20, reconstruct_lr=1e-3, factor_dtype="int8")
    plan = model.blastfx_plan
    assert seen == [[None], ["int8"]] * len(model.model.layers)         # per block: float pass, then codes
    assert len(rounded) == len(plan.layers)
    assert all(dt is None and fmt == "int8" and cov == (n, n) for dt, fmt, cov, n in rounded)
    assert all(model.get_submodule(n).U.dtype == torch.int8 for n in plan.layers)
    assert any(n.startswith("reconstruction around the quantized factors") and "of 2 blocks" in n for n in plan.notes)
    monkeypatch.undo()
    floats = compressed(dense, batches, reconstruct_steps=20, reconstruct_lr=1e-3)
    e_codes, e_float = block_errors64(model, dense, batches), block_errors64(floats, dense, batches)
    assert e_codes[-1] < 1.25 * e_float[-1], (e_codes, e_float)


def test_failure_while_rounding_restores_the_model(monkeypatch):
    import blastfx.structures.blast.quant as quant
    torch.manual_seed(0)
    model = models.tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing(*args, **kwargs):
        raise RuntimeError("rounding failed")
    monkeypatch.setattr(quant, "quantize_layer", failing)
    with pytest.raises(RuntimeError, match="rounding failed"):
        blastfx.compress(model, 0.4, config=BlastConfig(progress=False, sequential=True, reconstruct_steps=5,
                                                         reconstruct_lr=1e-3, factor_dtype="int8"),
                         calibration=[torch.randint(3, 128, (4, 32)) for _ in range(2)])
    assert not any(isinstance(m, blastfx.BlastLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
