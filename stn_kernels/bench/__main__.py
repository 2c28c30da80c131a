"""``python -m stn_kernels.bench``: see :mod:`stn_kernels.bench.cli`."""

from .cli import main

main()
