"""Progress bars of the calibration passes: described by what they collect, off with progress=False
or tqdm's own TQDM_DISABLE."""
import os
import subprocess
import sys

import torch
from torch import nn

import blastfx
from blastfx import BlastConfig
from blastfx.statistics.collect import collect_covariances, collect_output_fisher


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return x + self.fc(x)


class LossModel(nn.Module):
    """A chain of two blocks of one linear each; forward returns a scalar loss."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.square().mean()


BATCHES = [torch.randn(8, 32) for _ in range(3)]


def test_calibration_passes_show_what_they_collect(capsys):
    model = LossModel()
    collect_covariances(model, ["blocks.0.fc", "blocks.1.fc"], BATCHES, progress=True)
    collect_output_fisher(model, ["blocks.0.fc", "blocks.1.fc"], BATCHES, progress=True)
    err = capsys.readouterr().err
    assert "blastfx: input covariances of 2 layers" in err and "3/3" in err
    assert "blastfx: loss Fisher of 2 layers' outputs" in err


def test_compress_shows_every_pass_and_nothing_with_progress_false(capsys):
    cfg = dict(include=("*",), sequential=True, iters=2)
    blastfx.compress(LossModel(), 0.5, config=BlastConfig(**cfg), calibration=BATCHES, example_inputs=BATCHES[0])
    err = capsys.readouterr().err
    assert "loss Fisher" in err                                  # auto recipe: the model returns a loss
    assert "capturing the inputs of 2 blocks" in err
    assert "sequential calibration with error feedback" in err and "2/2 [" in err
    blastfx.compress(LossModel(), 0.5, config=BlastConfig(progress=False, **cfg), calibration=BATCHES,
                     example_inputs=BATCHES[0])
    assert "blastfx:" not in capsys.readouterr().err


def test_tqdm_disable_env_turns_bars_off():
    """tqdm reads TQDM_DISABLE when it is imported: a fresh process, with and without it."""
    script = ("import torch; from torch import nn; from blastfx.statistics.collect import collect_covariances; "
              "collect_covariances(nn.Linear(4, 4), [''], [torch.randn(2, 4)], progress=True)")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    shown = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    hidden = subprocess.run([sys.executable, "-c", script], env={**env, "TQDM_DISABLE": "1"}, capture_output=True,
                            text=True, check=True)
    assert "blastfx: input covariances of 1 layers" in shown.stderr
    assert "blastfx:" not in hidden.stderr
