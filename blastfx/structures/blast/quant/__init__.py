"""Quantized BLAST factors: U and V stored as int8, float8 or int4 (two per byte) codes with float32
scales, S and the bias in the activation dtype.

* :mod:`.formats`: the storage formats by name (``factor_dtype``) and the scale layout (U per row,
  V per column of r), quantize and dequantize, and int4's packing (:func:`.formats.pack_int4`).
* :mod:`.ops`: ``torch.ops.blastfx.blast_matmul_quantized`` and its plain-PyTorch reference
  (dequantize, then the BLAST reference).
* :mod:`.fit`: quantization inside the calibrated fit (round one factor, refit the others in closed
  form) and plain rounding, the baseline.
* :mod:`.model`: quantizing the float BLAST layers of a model after the fact (e.g. after finetuning).
"""
from . import formats
from .fit import QuantizedFactors, quantize_fitted, round_factors
from .formats import FORMATS, MODEL, FactorFormat
from .ops import blast_matmul_quantized, blast_matmul_quantized_reference


def __getattr__(name):          # the model-level helpers import the swap and io stages: load them on use
    if name in ("quantize_model", "quantize_layer"):
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["FORMATS", "MODEL", "FactorFormat", "QuantizedFactors", "blast_matmul_quantized",
           "blast_matmul_quantized_reference", "formats", "quantize_fitted", "quantize_layer", "quantize_model",
           "round_factors"]
