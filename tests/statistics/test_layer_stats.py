"""LayerStats and collection: exactly the statistics asked for, one pass each, equal to the collectors'."""
import pytest
import torch
from torch import nn

from blastfx.statistics import LayerStats, collect_covariances, collect_output_fisher, collect_statistics, stacked


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 1)
        self.passes = 0

    def forward(self, x):
        self.passes += 1
        return self.b(torch.tanh(self.a(x))).square().mean()           # a scalar: the loss


def test_only_what_is_needed_is_collected_and_it_equals_the_collectors():
    torch.manual_seed(0)
    net = Net()
    batches = [torch.randn(4, 6) for _ in range(3)]
    assert all(s == LayerStats() for s in collect_statistics(net, ["a", "b"], batches, set()).values())
    assert net.passes == 0
    stats = collect_statistics(net, ["a", "b"], batches, {"covariance"})
    assert net.passes == 3 and all(s.output_fisher is None for s in stats.values())
    X = torch.cat(batches).double()
    torch.testing.assert_close(stats["a"].covariance.double(), X.T @ X / len(X))      # float64 definition
    both = collect_statistics(net, ["a"], batches, {"covariance", "output_fisher"})
    torch.testing.assert_close(both["a"].output_fisher, collect_output_fisher(net, ["a"], batches)["a"])
    torch.testing.assert_close(both["a"].covariance, collect_covariances(net, ["a"], batches)["a"])
    assert collect_statistics(net, ["a"], None, {"covariance"}) == {"a": LayerStats()}


def test_bad_needs_are_named():
    with pytest.raises(ValueError, match=r"needs: \['hessian'\] are not statistics"):
        collect_statistics(Net(), ["a"], [torch.randn(2, 6)], {"hessian"})


def test_only_merged_and_stacked():
    c, f = torch.eye(3), torch.ones(2)
    s = LayerStats(covariance=c, output_fisher=f)
    assert s.only({"covariance"}) == LayerStats(covariance=c)
    assert s.merged(target=torch.zeros(2, 3)).target.shape == (2, 3) and s.target is None
    assert stacked([s, s], "covariance", "cpu").shape == (2, 3, 3)
    assert stacked([LayerStats(), LayerStats()], "covariance", "cpu") is None
    with pytest.raises(ValueError, match="statistic 'output_fisher' is measured for 1 of 2 layers"):
        stacked([s, LayerStats()], "output_fisher", "cpu")
