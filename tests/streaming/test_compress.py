"""compress in streaming mode, BlastConfig(compute_device=...): the same compressed model as the
sequential compress of the model in place, with one block on the compute device at a time, and the
model exactly as it was after an error.

The compute device is "cpu" here (no GPU on the test machine). Streaming still copies every block it
brings in, so residency is read from the storage: a block is resident while one of its tensors is off
its home storage. Same device, same operations: the results are equal tensor for tensor."""
import copy

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

import blastfx
import blastfx.sequential as seq
from blastfx import BlastConfig
from blastfx.build import build_layers
from blastfx.streaming import Residency, module_tensors
import models
from models import ResidualBlock


class SkipBlocks(nn.Module):
    """Three blocks, the last also reading the model input: not a chain, so the walk takes one full
    (streamed) pass per block."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(ResidualBlock() for _ in range(3))

    def forward(self, x):
        x = self.inp(x)
        h = self.blocks[1](self.blocks[0](x))
        return self.blocks[2](h + x)


def _llama_batches():
    return [{"input_ids": torch.randint(3, 128, (2, 16))} for _ in range(3)]


def _gpt2_batches():
    return [torch.randint(3, 128, (2, 16)) for _ in range(3)]


def _skip_batches():
    return [torch.randn(24, 16) for _ in range(3)]


CASES = {
    "llama, loss recipe": (models.tiny_llama, _llama_batches, {}),
    "llama, structure auto and block choices": (models.tiny_llama, _llama_batches,
                                                dict(structure="auto", block_choices=(2, 4), objective="output",
                                                     strategy="error")),
    "gpt2 (Conv1D), output objective": (models.tiny_gpt2, _gpt2_batches, {}),
    "not a chain": (SkipBlocks, _skip_batches, dict(include=("blocks.*",))),
}


def _compress(model, batches, **config):
    torch.manual_seed(1)
    config = BlastConfig(progress=False, sequential=True, reconstruct_steps=4, **config)
    return blastfx.compress(model, 0.5, config=config, calibration=batches)


@pytest.mark.parametrize("case", CASES)
def test_streaming_gives_the_same_compressed_model(case):
    make, batches, config = CASES[case]
    torch.manual_seed(0)
    dense, batches = make().eval(), batches()
    in_place = _compress(copy.deepcopy(dense), batches, **config)
    streamed = _compress(copy.deepcopy(dense), batches, compute_device="cpu", **config)
    assert streamed.blastfx_plan.layers == in_place.blastfx_plan.layers
    assert streamed.blastfx_plan.notes == in_place.blastfx_plan.notes
    assert any(isinstance(m, blastfx.BlastLinear) for m in streamed.modules())
    a, b = in_place.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _homes(model):
    return {id(t): t.data_ptr() for *_, t in module_tensors([model])}


def test_at_most_one_block_is_on_the_compute_device_at_any_layer_call_or_factorization(monkeypatch):
    """Which modules are resident is read from the Residency objects entered and not yet left (every
    move goes through one); that the called layer's weight really is a copy, from its storage."""
    model = models.tiny_llama()
    homes, versions = _homes(model), {id(t): t._version for *_, t in module_tensors([model])}
    blocks = ["model.layers.0", "model.layers.1"]
    entered = []
    enter, leave = Residency.enter, Residency.leave

    def spy_enter(self):
        entered.append(self)
        return enter(self)

    def spy_leave(self):
        if self in entered:
            entered.remove(self)
        return leave(self)
    monkeypatch.setattr(Residency, "enter", spy_enter)
    monkeypatch.setattr(Residency, "leave", spy_leave)

    def resident():
        inside = {id(t) for r in entered for *_, t in module_tensors(r.modules, r.skip)}
        return [b for b in blocks if any(id(t) in inside for *_, t in module_tensors([model.get_submodule(b)]))]
    calls, builds = [], []
    originals = {id(m) for m in model.modules()}

    def spy(name):
        def hook(module, args):
            if id(module) in originals and not is_fake(args[0]):    # analyze traces with fake tensors: no compute
                calls.append((name, resident(), module.weight.data_ptr() != homes[id(module.weight)]))
        return hook
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(spy(name))

    def spying_build(model, plan, stats, options, names):
        builds.append((sorted(names), resident()))
        return build_layers(model, plan, stats, options, names=names)
    monkeypatch.setattr(seq, "build_layers", spying_build)
    _compress(model, _llama_batches(), compute_device="cpu")

    in_blocks = [(name, where) for name, where, _ in calls if name.startswith("model.layers.")]
    assert len(in_blocks) > 14 * 3                    # every probe, statistics, capture and calibration pass seen
    for name, where in in_blocks:
        assert where == [seq.block_of(name)]          # the called layer's block is resident, no other is
    assert all(len(where) <= 1 for _, where, _ in calls)   # lm_head's calls: at most one block in as well
    assert all(copied for *_, copied in calls)        # every call read a compute copy, never the home tensor
    assert builds and all(where == [seq.block_of(names[0])] for names, where in builds)
    assert {seq.block_of(names[0]) for names, _ in builds} == set(blocks)
    assert not entered
    # afterwards the tensors compress kept unchanged are their original home tensors; all live at home
    kept = {id(t): t for *_, t in module_tensors([model]) if id(t) in homes}
    unchanged = [t for t in kept.values() if t._version == versions[id(t)]]
    assert unchanged and all(t.data_ptr() == homes[id(t)] for t in unchanged)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())


def test_bad_compute_device_is_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match="not a device torch knows"):
        BlastConfig(sequential=True, compute_device="gpu0")
    with pytest.raises(ValueError, match="holds no values"):
        BlastConfig(sequential=True, compute_device="meta")
    with pytest.raises(ValueError, match="must be a device string"):
        BlastConfig(sequential=True, compute_device=0)
    with pytest.raises(ValueError, match="leave sequential at 'auto' or set it True"):
        BlastConfig(sequential=False, compute_device="cpu")
    assert BlastConfig(compute_device="cpu").resolved(calibrated=True, returns_loss=False, budget=0.9).sequential
    with pytest.raises(ValueError, match="needs calibration data: pass calibration="):   # not "set sequential"
        blastfx.compress(models.tiny_llama(), 0.5, config=BlastConfig(compute_device="cpu", progress=False))
    missing = f"cuda:{torch.cuda.device_count()}"           # one past the last GPU: never available
    with pytest.raises(ValueError, match=f"'{missing}' is not available here"):
        BlastConfig(sequential=True, compute_device=missing)


def _snapshot(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _unchanged(model, before) -> bool:
    after = model.state_dict(keep_vars=True)
    return after.keys() == before.keys() and all(
        v.data_ptr() == before[k][0] and torch.equal(v, before[k][1]) for k, v in after.items())


@pytest.mark.filterwarnings("ignore::blastfx.api.WeightOnlyWarning")
def test_streaming_without_calibration_is_refused_before_the_model_is_touched():
    model = models.tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="compute_device='cpu' streams .* pass calibration="):
        blastfx.compress(model, 0.5, config=BlastConfig(progress=False, sequential=True, compute_device="cpu"))
    assert _unchanged(model, before)


@pytest.mark.parametrize("failing_block", [0, 1])     # block 1: after block 0 went home compressed
def test_a_failure_mid_walk_leaves_the_model_exactly_as_it_was(monkeypatch, failing_block):
    model = models.tiny_llama()
    before = _snapshot(model)
    built = []

    def failing(model, plan, stats, options, names):
        built.append(seq.block_of(sorted(names)[0]))
        if built.count(f"model.layers.{failing_block}") == 2:         # its second stage
            raise RuntimeError("factorization failed")
        return build_layers(model, plan, stats, options, names=names)
    monkeypatch.setattr(seq, "build_layers", failing)
    with pytest.raises(RuntimeError, match="factorization failed"):
        _compress(model, _llama_batches(), compute_device="cpu")
    assert not any(isinstance(m, blastfx.BlastLinear) for m in model.modules())
    assert _unchanged(model, before)                  # the same tensors, same storage, same values


def test_plan_for_streams_to_the_same_plan(monkeypatch):
    model = models.tiny_llama()
    before = _snapshot(model)
    batches = _llama_batches()
    config = dict(progress=False, sequential=True, strategy="loss")
    a = blastfx.plan_for(model, 0.5, BlastConfig(**config), calibration=batches)
    entered, enter = [], Residency.enter
    monkeypatch.setattr(Residency, "enter", lambda self, *args, **kw: entered.append(1) or enter(self, *args, **kw))
    b = blastfx.plan_for(model, 0.5, BlastConfig(compute_device="cpu", **config), calibration=batches)
    assert entered                                  # the streamed planner really moved modules in
    assert a.layers == b.layers
    assert _unchanged(model, before)


@pytest.mark.cuda
def test_streaming_through_the_gpu_matches_compressing_on_it_and_leaves_the_model_on_the_cpu():
    dense = models.tiny_llama()
    batches = _llama_batches()
    on_gpu = _compress(copy.deepcopy(dense).cuda(), batches)
    streamed = _compress(copy.deepcopy(dense), batches, compute_device="cuda")
    assert all(t.device.type == "cpu" for t in streamed.state_dict().values())
    assert streamed.blastfx_plan.layers == on_gpu.blastfx_plan.layers
    test = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        a, b, d = on_gpu(test.cuda()).logits.cpu(), streamed.cuda()(test.cuda()).logits.cpu(), dense(test).logits
    assert (a - b).norm() < 1e-3 * (a - d).norm()      # the same model up to GPU rounding, far closer than to dense
