"""SS1, the Sketch Structured Transform (Desai, Saedi, Walia, Lee, Zhou, Shrivastava, NeurIPS 2024).

A weight matrix whose entries share parameters in a random but tile-structured way: the input
dimension is cut into tiles of ``block_k`` features, ``reduction`` consecutive tiles (a power of two)
read one shared weight tile, each at a rotation hashed from the layer's seed, the input tile's
position and the output tile (:mod:`.layout` has the exact rule). The layer stores about
``out * in / reduction`` weights.

Why it is fast: a GEMM's K-loop over the shared tiles sums the ``reduction`` rotated input tiles of a
group first (cheap vector adds on the small operand) and does one dot with the shared weight tile, so
it reads ``reduction`` times fewer weight bytes and issues ``reduction`` times fewer dots than the
dense GEMM (:mod:`.kernel`). Decode is bound by weight bytes, so that is close to the speed-up there.

Why it compresses trained models well: the dense weight is projected onto the structure, each shared
slot the mean of the entries tied to it (the least-squares optimum), or with calibration data the
optimum of the layer's output error (:mod:`.project`); rows never share slots, so both are exact,
cheap solves.

* :class:`SS1Layout`, :func:`ss1_params` -- geometry, hash and cost (parameters per reduction factor).
* :func:`ss1_matmul` (``torch.ops.blastfx.ss1_matmul``), :func:`ss1_matmul_reference`,
  :func:`ss1_to_dense`, :func:`ss1_fold`.
* :class:`SS1Linear`, :func:`build_ss1`; :func:`project_weight`, :func:`project_calibrated`.
* :data:`SS1` (:mod:`.structure`): the registry entry the pipeline plans, builds, saves and loads
  through (``BlastConfig(structure="ss1")`` or ``"auto"``); :func:`projection_errors`
  (:mod:`.sensitivity`): each reduction's output error, what the planner allocates by.
"""
from .layout import SS1Layout, ss1_params
from .ops import ss1_fold, ss1_matmul, ss1_matmul_reference, ss1_to_dense
from .project import project_calibrated, project_weight
from .nn import SS1Linear, build_ss1
from .sensitivity import projection_errors
from .structure import SS1
from ..base import register

register(SS1)

__all__ = ["SS1", "SS1Layout", "SS1Linear", "build_ss1", "projection_errors", "project_calibrated", "project_weight", "ss1_fold", "ss1_matmul",
           "ss1_matmul_reference", "ss1_params", "ss1_to_dense"]
