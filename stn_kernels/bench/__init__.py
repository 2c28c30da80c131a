"""The stn_kernels benchmark: ``python -m stn_kernels.bench [--layer linear|conv2d|embedding|lstm]``.

Each provider of a layer (its published formulation, eager and compiled, and stn_kernels under
each backend) is timed side by side in one process, forward, backward and both, and checked
against a float32 evaluation of the published formulation. The package:

* :mod:`~stn_kernels.bench.harness`: what every layer shares (cases, providers, timing, the run
  of one case); it knows no layer.
* :mod:`~stn_kernels.bench.report`: rows, the printed and markdown tables, results.csv, the plot.
* :mod:`~stn_kernels.bench.linear`, :mod:`~stn_kernels.bench.conv2d`,
  :mod:`~stn_kernels.bench.embedding`, :mod:`~stn_kernels.bench.lstm`: one layer each (shapes,
  case factory, formulations, providers, and ``LAYER``, its :class:`~stn_kernels.bench.harness.Layer`).
* :mod:`~stn_kernels.bench.cli`: the command line (:func:`main`) and the layer table :data:`LAYERS`.

In code: ``case = LAYERS["linear"].make_case("6,3,16,24")`` then
``harness.provider_fn("stn:reference", case, "fwd+bwd")()``. Importing this package imports
torch and stn_kernels, nothing heavier: Triton only when timing on CUDA, matplotlib only to
draw the plot.
"""

from . import harness, report
from .cli import LAYERS, main

__all__ = ["LAYERS", "harness", "main", "report"]
