"""stn_kernels: fused kernels, ops and modules for Self-Tuning Networks.

Importing this package registers the ``torch.ops.stn_kernels`` ops and touches
no GPU and compiles nothing: the Triton kernels and the compiled extension load
on first use.
"""

from . import (
                         ops,  # noqa: F401  (registers torch.ops.stn_kernels.*)
                         stn,
)
from .backends import BACKENDS, BackendUnavailableError, requested_backend, use_backend
from .config import show_config
from .convert import convert, revert
from .freeze import freeze
from .functional import (
                         affine,
                         affine_draws,
                         augment_draws,
                         augment_images,
                         color_jitter,
                         cutout,
                         hyper_conv2d,
                         hyper_embedding,
                         hyper_linear,
                         hyper_lstm_layer,
                         hyper_lstm_recurrence,
                         input_scale,
                         per_example_channel_dropout,
                         per_example_dropout,
)
from .hparams_context import hparams
from .modules import HyperConv2d, HyperEmbedding, HyperLinear
from .modules_attention import HyperMultiheadAttention
from .modules_dropout import TunedDropout, TunedDropout1d, TunedDropout2d, TunedDropout3d
from .modules_lstm import HyperLSTM, HyperLSTMCell
from .version import __version__ as __version__  # re-exported

__all__ = [
    "BACKENDS", "BackendUnavailableError", "HyperConv2d", "HyperEmbedding", "HyperLSTM", "HyperLSTMCell",
    "HyperLinear", "affine", "affine_draws", "augment_draws", "augment_images", "color_jitter", "convert", "cutout",
    "freeze", "hparams", "hyper_conv2d",
    "hyper_embedding", "hyper_linear", "hyper_lstm_layer", "hyper_lstm_recurrence", "input_scale",
    "per_example_channel_dropout", "per_example_dropout", "requested_backend", "revert", "show_config", "stn",
    "TunedDropout", "TunedDropout1d", "TunedDropout2d", "TunedDropout3d", "use_backend", "HyperMultiheadAttention",
]
