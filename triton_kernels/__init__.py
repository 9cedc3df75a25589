"""Triton kernels of llkern (installed as llkern.triton_kernels)."""
