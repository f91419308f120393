"""The swap stage: all or nothing, interrupts included; the plan recorded on the model."""
import pytest
from torch import nn

from blastfx.plan import LayerPlan, Plan
from blastfx.swap import PLAN_ATTR, attach_plan, swap_modules


class Interrupting(nn.Module):
    def __setattr__(self, name, value):
        if name == "1" and isinstance(value, nn.Identity):
            raise KeyboardInterrupt
        super().__setattr__(name, value)


def test_swap_returns_the_old_modules_and_restores_on_an_interrupt():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    first, second = model[0], model[1]
    old = swap_modules(model, {"0": nn.ReLU()})
    assert old == {"0": first} and isinstance(model[0], nn.ReLU)
    swap_modules(model, old)
    assert model[0] is first

    outer = nn.Sequential(nn.Linear(2, 2))
    outer.add_module("inner", Interrupting())
    inner = outer.inner
    nn.Module.__setattr__(inner, "1", nn.Linear(2, 2))
    kept = inner.get_submodule("1")
    with pytest.raises(KeyboardInterrupt):
        swap_modules(outer, {"0": nn.ReLU(), "inner.1": nn.Identity()})
    assert isinstance(outer[0], nn.Linear) and inner.get_submodule("1") is kept
    assert second is model[1]


def test_attach_plan_records_the_plan():
    model = nn.Sequential(nn.Linear(8, 8))
    plan = Plan({"0": LayerPlan(8, 8, 1, 1)}, 0.5, dense_total=64)
    attach_plan(model, plan)
    assert getattr(model, PLAN_ATTR) is plan
