"""The BLAST factorization methods, by name: each fits factors to a prepared problem.

:func:`blastfx.factorize` does what every method shares (checks, scaling, padding, the whitening
factor of a calibration covariance, the output-row weighting, the final balance and errors) and
hands the method a :class:`Problem`; the method returns ``(U, S, V, history)``. ``uses`` says which
calibration statistics the compression pipeline gives it (see :mod:`blastfx.structures.base`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ...base import Method
from ..layout import BlastShape
from .als import run_als, svd_init
from .precgd import random_init, run_precgd
from .structured import STRUCTURES
from .weighted import run_weighted_als, whitened_svd_init

CALIBRATED = frozenset({"covariance", "output_fisher"})


@dataclass
class Problem:
    """A padded, scaled batch ``A`` (B, m_pad, n_pad) to fit with ``shape``; ``L`` the Cholesky factor of
    the damped, normalized input covariance (None: fit the weights alone); the options of
    :func:`blastfx.factorize`, ``None`` meaning the method's default."""
    A: torch.Tensor
    shape: BlastShape
    L: torch.Tensor | None
    iters: int | None
    tol: float
    target_error: float | None
    damping: float
    delta: float
    init: str
    generator: torch.Generator
    progress: bool

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self.shape.b_out, self.shape.b_in, self.shape.rank

    def start(self):
        return (svd_init if self.init == "svd" else random_init)(self.A, *self.sizes, self.generator)


@contextmanager
def _progress(problem: Problem, name: str, iters: int):
    bar = None
    if problem.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=iters, desc=f"factorize ({name})")

    def callback(it, rel):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rel_error=f"{rel.max().item():.4f}")
    try:
        yield callback
    finally:
        if bar is not None:
            bar.close()


def fit_als(p: Problem):
    """SVD warm start + exact ALS (:mod:`.als`); with calibration, weighted ALS from the whitened SVD."""
    if p.L is not None:
        U, S, V = whitened_svd_init(p.A, p.L, *p.sizes)
        return run_weighted_als(p.A, p.L @ p.L.mT, U, S, V, iters=p.iters or ALS.defaults["calibrated_iters"],
                                tol=p.tol, damping=p.damping, target_error=p.target_error)
    iters = p.iters or ALS.defaults["iters"]
    with _progress(p, "als", iters) as callback:
        return run_als(p.A, *p.start(), iters=iters, tol=p.tol, damping=p.damping, target_error=p.target_error,
                       callback=callback)


def fit_precgd(p: Problem):
    """The BLAST paper's preconditioned gradient descent (:mod:`.precgd`)."""
    iters = p.iters or PRECGD.defaults["iters"]
    with _progress(p, "precgd", iters) as callback:
        return run_precgd(p.A, *p.start(), iters=iters, delta=p.delta, target_error=p.target_error,
                          callback=callback)


def fit_lowrank(p: Problem):
    """The truncated SVD (every s_ij = 1); with calibration, the whitened SVD."""
    if p.L is not None:
        return (*whitened_svd_init(p.A, p.L, *p.sizes), None)
    return (*STRUCTURES["lowrank"](p.A, *p.sizes, p.generator), None)


def _structured(name):
    def fit(p: Problem):
        return (*STRUCTURES[name](p.A, *p.sizes, p.generator), None)
    fit.__doc__ = f"The {name} structure as an exact BLAST configuration (:mod:`.structured`)."
    return fit


ALS = Method("als", fit_als, CALIBRATED, {"init": "svd", "iters": 100, "calibrated_iters": 30})
PRECGD = Method("precgd", fit_precgd, frozenset(), {"init": "random", "iters": 300})
METHODS: dict[str, Method] = {
    "als": ALS,
    "precgd": PRECGD,
    "lowrank": Method("lowrank", fit_lowrank, CALIBRATED, {"init": "svd"}),
    **{name: Method(name, _structured(name), frozenset(), {"init": "svd"})
       for name in STRUCTURES if name != "lowrank"},
}
