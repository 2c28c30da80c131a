"""Triton kernels of stn_kernels (imported lazily, only by the triton backend)."""
