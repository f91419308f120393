"""Triton kernels for blast_matmul. Each is checked against :func:`blastfx.ops.blast_matmul_reference`."""
