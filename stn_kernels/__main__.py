"""``python -m stn_kernels``: prints :func:`stn_kernels.show_config` (versions, compiled extensions, backends)."""

from .config import show_config

print(show_config())
