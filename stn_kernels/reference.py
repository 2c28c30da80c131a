"""Pure-PyTorch reference implementations of the STN layer ops.

One reference per op. Tests and benchmarks import these as ground truth, and the
``"reference"`` backend (the CPU path) runs them. Shapes use M for rows (examples,
or examples times positions once leading dims are flattened), K for input
features, N for output features and H for hyperparameters.

    out = x·W_elemᵀ + (λ·Vᵀ) ⊙ (x·W_hyperᵀ) + b_elem + (λ·Cᵀ) ⊙ b_hyper

V ("weight_scale", [N, H]) scales the hyper weight path per output feature and C
("bias_scale", [N, H]) the hyper bias. λ, V and C may be float32 while x and the
weights are half precision: the small λ products are formed in their own dtype
and cast to the input dtype before they touch the [M, N] tensors.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def hparam_scales(hparams: Tensor, weight_scale: Tensor, bias_scale: Optional[Tensor], dtype: torch.dtype):
    """s = λ·Vᵀ and t = λ·Cᵀ (t is None without a bias scale), cast to ``dtype``.

    F.linear needs no transposed view and the cast is skipped when a no-op: each is a µs of host time
    per call, which is what a layer costs at small shapes."""
    s = F.linear(hparams, weight_scale)
    t = None if bias_scale is None else F.linear(hparams, bias_scale)
    if s.dtype != dtype:
        s = s.to(dtype)
        t = None if t is None else t.to(dtype)
    return s, t


def add_product(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """a + b ⊙ c for the composites torch differentiates: one addcmul under no_grad, else a product and a sum
    (addcmul's backward forms two products more than theirs)."""
    return a + b * c if torch.is_grad_enabled() else torch.addcmul(a, b, c)


def stacked_scales(hparams: Tensor, hparam_weight: Tensor, dtype: torch.dtype):
    """(s, t) from the modules' stacked hparam_weight [V; C] [2N, H]: one GEMM and one chunk."""
    st = F.linear(hparams, hparam_weight)
    # chunk is a C++ method; Tensor.split goes through a Python wrapper (a few µs per call at these shapes).
    return (st if st.dtype == dtype else st.to(dtype)).chunk(2, 1)


def hyper_linear_forward(
    x: Tensor,
    hparams: Optional[Tensor],
    weight: Tensor,
    hyper_weight: Tensor,
    bias: Optional[Tensor],
    hyper_bias: Optional[Tensor],
    weight_scale: Optional[Tensor],
    bias_scale: Optional[Tensor],
):
    """Forward of the 2-D op: x [M, K], hparams [M, H] or None.

    Returns ``(out, z_hyper)`` with z_hyper = x·W_hyperᵀ (saved for the backward;
    an empty tensor when hparams is None). Two GEMMs, no weight packing: on the
    CPU this is what the benchmark in ``stn_kernels.bench`` found fastest.
    """
    scales = None if hparams is None else hparam_scales(hparams, weight_scale, bias_scale, x.dtype)
    return _linear_forward(x, weight, hyper_weight, bias, hyper_bias, scales)


def hyper_linear_stacked_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight):
    """:func:`hyper_linear_forward` with V and C stacked as the modules' hparam_weight [2N, H]: ``(out, z_hyper,
    scales)``, scales = (s, t) (None without hparams) for :func:`hyper_linear_stacked_backward`, which then
    need not form them again (a GEMM and a chunk, ~4% of a forward+backward at the STN shapes on the CPU)."""
    scales = None if hparams is None else stacked_scales(hparams, hparam_weight, x.dtype)
    return (*_linear_forward(x, weight, hyper_weight, bias, hyper_bias, scales), scales)


def _linear_forward(x, weight, hyper_weight, bias, hyper_bias, scales):
    out = F.linear(x, weight, bias)
    if scales is None:
        return out, x.new_empty(0)
    z_hyper = F.linear(x, hyper_weight)
    out.addcmul_(scales[0], z_hyper)
    if hyper_bias is not None:
        out.addcmul_(scales[1], hyper_bias)
    return out, z_hyper


def hyper_linear(x, hparams, weight, hyper_weight, bias=None, hyper_bias=None, weight_scale=None, bias_scale=None):
    """The layer's output only (see :func:`hyper_linear_forward`)."""
    return hyper_linear_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)[0]


def hyper_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    hparams: Optional[Tensor],
    weight: Tensor,
    hyper_weight: Tensor,
    hyper_bias: Optional[Tensor],
    weight_scale: Optional[Tensor],
    bias_scale: Optional[Tensor],
    z_hyper: Optional[Tensor],
    output_mask: Sequence[bool] = (True,) * 8,
):
    """Gradients of the 2-D op, in argument order.

    Returns a list of 8 entries (x, hparams, weight, hyper_weight, bias,
    hyper_bias, weight_scale, bias_scale); an entry is None where its input is
    None or ``output_mask`` says it is not needed. With ``z_hyper=None``,
    x·W_hyperᵀ is recomputed. (Double backward differentiates the forward
    instead: see ``stn_kernels.ops``.)

        g_s = g ⊙ s            dx  = g·W_elem + g_s·W_hyper
        dW_elem = gᵀ·x         dW_hyper = g_sᵀ·x
        db_elem = Σ_m g        db_hyper = Σ_m g ⊙ t
        dλ = (g ⊙ z_hyper)·V + (g ⊙ b_hyper)·C
        dV = (g ⊙ z_hyper)ᵀ·λ  dC = (g ⊙ b_hyper)ᵀ·λ
    """
    return _separate_scales_backward(_linear_backward, grad_out, hparams, weight_scale, bias_scale, output_mask,
                                     x, weight, hyper_weight, hyper_bias, z_hyper)


def hyper_linear_stacked_backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, hparam_weight, z_hyper,
                                  output_mask, scales=None):
    """Gradients of :func:`hyper_linear_stacked_forward` for (x, hparams, weight, hyper_weight, bias,
    hyper_bias, hparam_weight), None where not needed: d[V; C] and dλ are one GEMM each,
    dλ = [g ⊙ z_hyper, g ⊙ b_hyper]·[V; C] and d[V; C] = [g ⊙ z_hyper, g ⊙ b_hyper]ᵀ·λ."""
    return _stacked_scales_backward(_linear_backward, grad_out, hparams, hparam_weight, output_mask, scales, x,
                                    weight, hyper_weight, hyper_bias, z_hyper)


def _separate_scales_backward(core, g, hparams, weight_scale, bias_scale, output_mask, *args):
    """A backward on V and C: their scales, ``core`` (:func:`_linear_backward`, :func:`_conv2d_backward`) for
    the rest, then dλ, dV, dC from its ds and dt. 8 gradients."""
    need = list(output_mask)
    scales = None if hparams is None else hparam_scales(hparams, weight_scale, bias_scale, g.dtype)
    grads, ds, dt = core(g, scales, need[:6] + [need[1] or need[6] or (bias_scale is not None and need[7])],
                         hparams, *args)
    grads += [None, None]
    if ds is not None:
        grads[1], grads[6], grads[7] = _hparam_grads(ds, dt, hparams, weight_scale, bias_scale, need[1], need[6],
                                                     need[7])
    return grads


def _stacked_scales_backward(core, g, hparams, hparam_weight, output_mask, scales, *args):
    """A backward on the stacked [V; C]: as :func:`_separate_scales_backward`, 7 gradients; ``scales`` those of
    the stacked forward, or None to form them again."""
    need = list(output_mask)
    if scales is None and hparams is not None:
        scales = stacked_scales(hparams, hparam_weight, g.dtype)
    grads, ds, dt = core(g, scales, need[:6] + [need[1] or need[6]], hparams, *args)
    grads[1], d_hparam_weight = _stacked_hparam_grads(ds, dt, hparams, hparam_weight, need[1], need[6])
    return grads + [d_hparam_weight]


def _linear_backward(g, scales, need, hparams, x, weight, hyper_weight, hyper_bias, z_hyper):
    """(grads of x, λ (None: left to the caller), W, W_h, b, b_h; ds = g ⊙ z_hyper and dt = g ⊙ b_hyper in λ's
    dtype when need[6] (the λ side) asks for them, else None)."""
    grads: list = [None] * 6
    if scales is None:
        if need[0]:
            grads[0] = g @ weight
        if need[2]:
            grads[2] = g.t() @ x
        if need[4]:
            grads[4] = g.sum(0)
        return grads, None, None
    s, t = scales
    g_s = g * s
    if need[0]:
        grads[0] = (g @ weight).addmm_(g_s, hyper_weight)
    if need[2]:
        grads[2] = g.t() @ x
    if need[3]:
        grads[3] = g_s.t() @ x
    if need[4]:
        grads[4] = g.sum(0)
    if hyper_bias is not None and need[5]:
        grads[5] = (g * t).sum(0)
    if not need[6]:
        return grads, None, None
    if z_hyper is None:
        z_hyper = F.linear(x, hyper_weight)
    # The λ-side products run in the dtype of λ and V (float32 for half inputs).
    ds, dt = g * z_hyper, None if hyper_bias is None else g * hyper_bias
    if ds.dtype != hparams.dtype:
        ds, dt = ds.to(hparams.dtype), None if dt is None else dt.to(hparams.dtype)
    return grads, ds, dt


def hyper_conv2d_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale,
                         stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """out[b,c] = conv(x, W_elem)[b,c] + s[b,c]·conv(x, W_hyper)[b,c] + b_elem[c] + t[b,c]·b_hyper[c].

    x [B, C_in, H, W]; hparams [B, H_p] or None; s = λ·Vᵀ and t = λ·Cᵀ are [B, C_out].
    Returns ``(out, z_hyper)`` with z_hyper = conv(x, W_hyper) (empty when hparams is None).
    """
    scales = None if hparams is None else hparam_scales(hparams, weight_scale, bias_scale, x.dtype)
    return _conv2d_forward(x, weight, hyper_weight, bias, hyper_bias, scales, stride, padding, dilation, groups)


def hyper_conv2d_stacked_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, stride,
                                 padding, dilation, groups):
    """:func:`hyper_conv2d_forward` with V and C stacked as the modules' hparam_weight [2C_out, H].

    With ``groups == 1`` both convolutions are one, over the stacked [W; W_hyper] (twice the output
    channels): at the STN shapes on the CPU a convolution's fixed cost is most of its time, and the
    module's fast path (whose backward torch forms) needs z_hyper only as a view. ``(out, z_hyper, scales)``
    as :func:`hyper_linear_stacked_forward`."""
    if hparams is None or groups != 1:
        scales = None if hparams is None else stacked_scales(hparams, hparam_weight, x.dtype)
        return (*_conv2d_forward(x, weight, hyper_weight, bias, hyper_bias, scales, stride, padding, dilation,
                                 groups), scales)
    s, t = stacked_scales(hparams, hparam_weight, x.dtype)
    batch, channels = s.shape
    both = F.conv2d(x, torch.cat([weight, hyper_weight]), None, stride, padding, dilation)
    elem, z_hyper = both[:, :channels], both[:, channels:]
    shift = bias if hyper_bias is None else (bias if bias is not None else 0) + t * hyper_bias
    out = torch.addcmul(elem, s.view(batch, channels, 1, 1), z_hyper)
    if shift is not None:
        out = out + shift.view(-1, channels, 1, 1)
    return out.contiguous(memory_format=dense_format(x)), z_hyper, (s, t)


def _conv2d_forward(x, weight, hyper_weight, bias, hyper_bias, scales, stride, padding, dilation, groups):
    # Outputs in the input's layout (channels_last in, channels_last out), whatever conv chose.
    layout = dense_format(x)
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous(memory_format=layout)
    if scales is None:
        return out, x.new_empty(0)
    s, t = scales
    z_hyper = F.conv2d(x, hyper_weight, None, stride, padding, dilation, groups).contiguous(memory_format=layout)
    batch, channels = s.shape
    out.addcmul_(s.view(batch, channels, 1, 1), z_hyper)
    if hyper_bias is not None:
        out.add_((t * hyper_bias).view(batch, channels, 1, 1))
    return out, z_hyper


def dense_format(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out so, else contiguous: the layout conv outputs follow."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def hyper_conv2d(x, hparams, weight, hyper_weight, bias=None, hyper_bias=None, weight_scale=None, bias_scale=None,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """The layer's output only (see :func:`hyper_conv2d_forward`)."""
    return hyper_conv2d_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale,
                                stride, padding, dilation, groups)[0]


def hyper_conv2d_backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale, z_hyper,
                          stride, padding, dilation, groups, output_mask=(True,) * 8):
    """Gradients of :func:`hyper_conv2d_forward` in argument order (8 entries, None where not needed).

    The two weight paths go through ``aten.convolution_backward`` (grad g for W_elem,
    g ⊙ s for W_hyper); the per-channel λ terms reduce g over the spatial dims first.
    """
    return _separate_scales_backward(_conv2d_backward, grad_out, hparams, weight_scale, bias_scale, output_mask,
                                     x, weight, hyper_weight, hyper_bias, z_hyper, stride, padding, dilation, groups)


def hyper_conv2d_stacked_backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, hparam_weight, z_hyper,
                                  stride, padding, dilation, groups, output_mask, scales=None):
    """Gradients of :func:`hyper_conv2d_stacked_forward` (7 entries, as :func:`hyper_linear_stacked_backward`)."""
    return _stacked_scales_backward(_conv2d_backward, grad_out, hparams, hparam_weight, output_mask, scales, x,
                                    weight, hyper_weight, hyper_bias, z_hyper, stride, padding, dilation, groups)


def _conv2d_backward(g, scales, need, hparams, x, weight, hyper_weight, hyper_bias, z_hyper, stride, padding,
                     dilation, groups):
    """As :func:`_linear_backward`, for the conv (ds and dt reduced over the spatial dims)."""
    grads: list = [None] * 6

    def conv_backward(grad, w, with_bias):
        return torch.ops.aten.convolution_backward(
            grad, x, w, [w.shape[0]] if with_bias else None, list(stride), list(padding), list(dilation), False,
            [0, 0], groups, [need[0], need[2] if w is weight else need[3], with_bias])

    dx, grads[2], grads[4] = conv_backward(g, weight, need[4])
    grads[2] = None if grads[2] is None else grads[2].contiguous(memory_format=dense_format(weight))
    if scales is None:
        grads[0] = None if dx is None else dx.contiguous(memory_format=dense_format(x))
        return grads, None, None
    s, t = scales
    batch, channels = s.shape
    dx_hyper, grads[3], _ = conv_backward(g * s.view(batch, channels, 1, 1), hyper_weight, False)
    grads[3] = None if grads[3] is None else grads[3].contiguous(memory_format=dense_format(hyper_weight))
    if need[0]:
        grads[0] = (dx + dx_hyper).contiguous(memory_format=dense_format(x))
    g_sum = g.sum((2, 3))
    if hyper_bias is not None and need[5]:
        grads[5] = (g_sum * t).sum(0)
    if not need[6]:
        return grads, None, None
    ds, dt = (g * z_hyper).sum((2, 3)), None if hyper_bias is None else g_sum * hyper_bias
    if ds.dtype != hparams.dtype:
        ds, dt = ds.to(hparams.dtype), None if dt is None else dt.to(hparams.dtype)
    return grads, ds, dt


def _stacked_hparam_grads(ds, dt, hparams, hparam_weight, need_hparams, need_hparam_weight):
    """(dλ, d[V; C]) from ds = dL/ds and dt = dL/dt (None: no hyper bias, C takes no part and its rows of the
    gradient are zeros): one GEMM each, dλ = [ds, dt]·[V; C] and d[V; C] = [ds, dt]ᵀ·λ."""
    if ds is None:
        return None, None
    d_scales = torch.cat([ds, torch.zeros_like(ds) if dt is None else dt], 1)
    return (d_scales @ hparam_weight if need_hparams else None,
            d_scales.t() @ hparams if need_hparam_weight else None)


def _hparam_grads(ds, dt, hparams, weight_scale, bias_scale, need_hparams, need_weight_scale, need_bias_scale):
    """dλ = ds·V + dt·C, dV = dsᵀ·λ, dC = dtᵀ·λ (each None where not needed or dt is None)."""
    d_hparams = d_weight_scale = d_bias_scale = None
    if need_hparams:
        d_hparams = ds @ weight_scale
        if dt is not None:
            d_hparams = d_hparams + dt @ bias_scale
    if need_weight_scale:
        d_weight_scale = ds.t() @ hparams
    if dt is not None and need_bias_scale:
        d_bias_scale = dt.t() @ hparams
    return d_hparams, d_weight_scale, d_bias_scale


def hyper_embedding_forward(indices, hparams, weight, hyper_weight, weight_scale):
    """out[m] = E_elem[i_m] + (λ_m·Vᵀ) ⊙ E_hyper[i_m]; indices [M], hparams [M, H] or None."""
    out = F.embedding(indices, weight)
    if hparams is None:
        return out
    s = (hparams @ weight_scale.t()).to(weight.dtype)
    return out + s * F.embedding(indices, hyper_weight)


hyper_embedding = hyper_embedding_forward


def hyper_embedding_by_example(indices, hparams, weight, hyper_weight, weight_scale, batch_dim: int = 0):
    """The embedding for indices of any shape with λ [B, H] per example along ``batch_dim`` (0 or 1): s = λ·Vᵀ
    is formed once per example and broadcast, where the op takes one λ row per index. Plain torch ops,
    differentiable by torch: the modules' path on the reference backend (4 ops, no reshapes)."""
    out = F.embedding(indices, weight)
    if hparams is None:
        return out
    s = F.linear(hparams, weight_scale)
    if s.dtype != out.dtype:
        s = s.to(out.dtype)
    trailing = indices.dim() - 1 - batch_dim  # index dims after the batch dim, which s broadcasts over
    if trailing:
        s = s.view(s.shape[0], *([1] * trailing), s.shape[1])
    return add_product(out, s, F.embedding(indices, hyper_weight))


def hyper_embedding_backward(grad_out, indices, hparams, weight, hyper_weight, weight_scale, output_mask=(True,) * 5):
    """Gradients for (indices, hparams, weight, hyper_weight, weight_scale); indices never get one."""
    need = list(output_mask)
    g = grad_out
    grads: list = [None] * 5
    if need[2]:
        grads[2] = torch.zeros_like(weight).index_add_(0, indices, g)
    if hparams is None:
        return grads
    s = (hparams @ weight_scale.t()).to(g.dtype)
    if need[3]:
        grads[3] = torch.zeros_like(hyper_weight).index_add_(0, indices, g * s)
    if need[1] or need[4]:
        ds = (g * F.embedding(indices, hyper_weight)).to(hparams.dtype)
        grads[1], grads[4], _ = _hparam_grads(ds, None, hparams, weight_scale, None, need[1], need[4], False)
    return grads
