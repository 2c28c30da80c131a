"""The ``stn_kernels`` operator library: the only place ops are registered with ``torch.library``.

One file per op, each holding the op's schema (``custom_op``), fake kernel, autograd registration,
eager ``torch.autograd.Function`` and ``apply_<op>`` entry (the branch itself is written once, in
:mod:`._support`):

============================  =========================================================================
op file                       ops registered
============================  =========================================================================
``hyper_linear.py``           ``stn_kernels::hyper_linear``, ``hyper_linear_backward`` (and the private
                              ``_cuda_hyper_linear_epilogue`` / ``_backward_reduce`` of the cuda backend)
``hyper_conv2d.py``           ``stn_kernels::hyper_conv2d``, ``hyper_conv2d_backward``
``hyper_embedding.py``        ``stn_kernels::hyper_embedding``, ``hyper_embedding_backward``
``hyper_lstm_recurrence.py``  ``stn_kernels::hyper_lstm_recurrence``, ``hyper_lstm_recurrence_backward``
``per_example_dropout.py``    ``stn_kernels::per_example_dropout`` (its own backward)
``augment.py``                ``stn_kernels::augment``, ``augment_backward``
``affine.py``                 ``stn_kernels::affine``, ``affine_backward``
============================  =========================================================================

The ops take the 2-D / 3-D / 4-D tensors the kernels see; the public functions in
:mod:`stn_kernels.functional` validate user input and call ``apply_<op>``. Each op asks
:func:`stn_kernels.backends.kernels` for its backend's module when it runs.
"""

from ._support import eager
from .affine import apply_affine
from .augment import apply_augment
from .hyper_conv2d import apply_hyper_conv2d, apply_hyper_conv2d_stacked
from .hyper_embedding import apply_hyper_embedding
from .hyper_linear import apply_hyper_linear, apply_hyper_linear_stacked
from .hyper_lstm_recurrence import apply_hyper_lstm_recurrence
from .per_example_dropout import apply_per_example_dropout

__all__ = ["apply_affine", "apply_augment", "apply_hyper_conv2d", "apply_hyper_conv2d_stacked",
           "apply_hyper_embedding", "apply_hyper_linear", "apply_hyper_linear_stacked", "apply_hyper_lstm_recurrence",
           "apply_per_example_dropout", "eager"]
