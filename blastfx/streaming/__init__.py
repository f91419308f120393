"""Streaming mode: compress a model larger than the accelerator, ``BlastConfig(compute_device=...)``.

The model stays where it lives (the CPU); only what is being computed on is on the compute device:
during whole-model calibration passes the non-block modules and the one block being called
(:mod:`.passes`), during the sequential walk the one block being calibrated, built and reconstructed,
with its calibration streams. Every move goes through :class:`~.residency.Residency`, which puts
unchanged weights back as they were and sends new or changed ones home, so the compute device holds
one block plus activations, not the model. :func:`~.disk.attach_safetensors` gives a model built on
the meta device its weights from safetensors files, memory-mapped, so they stay on disk until their
block's turn comes.
"""
from .disk import attach_safetensors, check_no_meta
from .passes import StreamedPasses, home_device, streamed, units
from .residency import LayerByLayer, Residency, layer_by_layer, module_tensors

__all__ = ["LayerByLayer", "Residency", "StreamedPasses", "attach_safetensors", "check_no_meta", "home_device",
           "layer_by_layer", "module_tensors", "streamed", "units"]
