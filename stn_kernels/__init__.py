"""stn_kernels: fused kernels, ops and modules for Self-Tuning Networks.

Importing this package registers the ``torch.ops.stn_kernels`` ops and touches
no GPU and compiles nothing: the Triton kernels and the compiled extension load
on first use.
"""

from . import ops  # noqa: F401  (registers torch.ops.stn_kernels.*)
from ._backend import BACKENDS, BackendUnavailableError, requested_backend, use_backend
from .functional import hyper_conv2d, hyper_embedding, hyper_linear
from .modules import HyperConv2d, HyperEmbedding, HyperLinear

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "HyperConv2d", "HyperEmbedding", "HyperLinear", "hyper_conv2d",
    "hyper_embedding", "hyper_linear", "requested_backend", "use_backend",
]

# STN training toolkit (hyperparameters, per-example dropout, Algorithm 1) and layer conversion.
from . import stn  # noqa: E402  (registers torch.ops.stn_kernels.per_example_dropout)
from .convert import convert  # noqa: E402

__all__ += ["convert", "stn"]

# HyperLSTM (registers torch.ops.stn_kernels.hyper_lstm_recurrence and _backward)
from .lstm import HyperLSTM, HyperLSTMCell, hyper_lstm_layer, hyper_lstm_recurrence  # noqa: E402

__all__ += ["HyperLSTM", "HyperLSTMCell", "hyper_lstm_layer", "hyper_lstm_recurrence"]
