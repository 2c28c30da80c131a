"""The calls whose kernel launches :mod:`.aot` records and compiles ahead of time, and the fast subset.

Every op through the public API and the modules, forward and backward (every gradient asked for): each dtype
the kernels take (float16, bfloat16, float32 with TF32 on and off: the fp32 dots' input precision follows
``torch.backends.cuda.matmul.allow_tf32``), λ per example / shared / none, biases on and off, a half layer with
a float32 λ side, sizes that are multiples of 16 and odd ones (the JIT specialises pointers and integers on
16-divisibility and integers on == 1), split-K and chunked reductions (large M, N), the convolution's packed
and two-conv paths in both memory formats and with groups, the embedding's atomic and sorted table gradients,
HyperLSTM with and without biases and initial state, dropout per element and per channel, augmentation with
and without colour jitter (C = 3, 1; uint8) and the affine transform (nearest, bilinear). Tiny shapes: only
the launches matter (nothing is computed), so a case costs milliseconds.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# (name, dtype, TF32 for fp32 matmuls)
MATMUL_DTYPES = (("fp16", F16, True), ("bf16", BF16, True), ("fp32-tf32", F32, True), ("fp32-ieee", F32, False))
H = 3  # hyperparameters


def _grads(out, *inputs):
    """Every gradient of ``out`` (the backward kernels launch for each)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)


def _leaf(*shape, dtype=F32, grad=True):
    return (torch.randn(*shape) * 0.1).to(dtype).requires_grad_(grad)


def _lam(mode: str, batch: int, dtype):
    if mode == "none":
        return None
    if mode == "shared":
        return _leaf(H, dtype=dtype)
    return _leaf(batch, H, dtype=dtype)


def _tf32(on: bool):
    torch.backends.cuda.matmul.allow_tf32 = on


def linear_case(dtype, tf32, lam="example", bias=True, M=64, N=96, K=80, lam_dtype=None):
    def call():
        import stn_kernels

        _tf32(tf32)
        x = _leaf(M, K, dtype=dtype)
        w, wh = _leaf(N, K, dtype=dtype), _leaf(N, K, dtype=dtype)
        b, hb = (_leaf(N, dtype=dtype), _leaf(N, dtype=dtype)) if bias else (None, None)
        side = lam_dtype or dtype
        v, c = _leaf(N, H, dtype=side), _leaf(N, H, dtype=side)
        lam_t = _lam(lam, M, side)
        out = stn_kernels.hyper_linear(x, lam_t, w, wh, b, hb, v if lam_t is not None else None,
                                       c if lam_t is not None and bias else None)
        _grads(out, x, w, wh, b, hb, v, c, lam_t)
    return call


def conv_case(dtype, lam="example", bias=True, packed=True, channels_last=False, groups=1, cin=4, cout=8, hw=6):
    def call():
        import stn_kernels
        from stn_kernels.backends.triton import hyper_conv2d as hc

        saved = hc.PACKED
        hc.PACKED = packed
        try:
            x = _leaf(5, cin, hw, hw, dtype=dtype)
            if channels_last:
                x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            w, wh = _leaf(cout, cin // groups, 3, 3, dtype=dtype), _leaf(cout, cin // groups, 3, 3, dtype=dtype)
            b, hb = (_leaf(cout, dtype=dtype), _leaf(cout, dtype=dtype)) if bias else (None, None)
            v, c = _leaf(cout, H, dtype=dtype), _leaf(cout, H, dtype=dtype)
            lam_t = _lam(lam, 5, dtype)
            out = stn_kernels.hyper_conv2d(x, lam_t, w, wh, b, hb, v if lam_t is not None else None,
                                           c if lam_t is not None and bias else None, padding=1, groups=groups)
            _grads(out, x, w, wh, b, hb, v, c, lam_t)
        finally:
            hc.PACKED = saved
    return call


def embedding_case(dtype, lam="example", sorted_grad=False, D=40):
    def call():
        import stn_kernels
        from stn_kernels.backends.triton import hyper_embedding as he

        saved = he.TABLE_GRAD
        he.TABLE_GRAD = "sorted" if sorted_grad else "atomic"
        try:
            idx = torch.randint(0, 50, (6, 7))
            e, eh = _leaf(50, D, dtype=dtype), _leaf(50, D, dtype=dtype)
            v = _leaf(D, H, dtype=dtype)
            lam_t = _lam(lam, 6, dtype)
            out = stn_kernels.hyper_embedding(idx, lam_t, e, eh, v if lam_t is not None else None)
            _grads(out, e, eh, v, lam_t)
        finally:
            he.TABLE_GRAD = saved
    return call


def lstm_case(dtype, tf32, lam="example", bias=True, hx=True, B=5, N=20, layers=1):
    def call():
        import stn_kernels

        _tf32(tf32)
        lstm = stn_kernels.HyperLSTM(12, N, layers, bias, num_hparams=H).to(dtype)
        x = _leaf(4, B, 12, dtype=dtype)
        state = (_leaf(layers, B, N, dtype=dtype), _leaf(layers, B, N, dtype=dtype)) if hx else None
        lam_t = _lam(lam, B, dtype)
        out, (h, c) = lstm(x, state, lam_t)
        _grads(out.float().sum() + h.float().sum() + c.float().sum(), x, lam_t, *lstm.parameters(),
               *(state or ()))
    return call


def dropout_case(dtype, per_channel=False):
    def call():
        import stn_kernels

        x = _leaf(4, 3, 5, 7, dtype=dtype)
        out = stn_kernels.per_example_dropout(x, torch.rand(4) * 0.5, per_channel=per_channel, seed=3)
        _grads(out, x)
    return call


def augment_case(dtype, jitter=True, channels=3, uint8=False):
    def call():
        import stn_kernels

        x = torch.rand(3, channels, 9, 11)
        x = (x * 255).to(torch.uint8) if uint8 else x.to(dtype)
        colour = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2) if jitter else {}
        stn_kernels.augment_images(x, holes=2, length=4, scale=0.3, seed=5, **colour)
    return call


def affine_case(dtype, interpolation="nearest", uint8=False):
    def call():
        import stn_kernels

        x = torch.rand(3, 3, 9, 11)
        x = (x * 255).to(torch.uint8) if uint8 else x.to(dtype)
        stn_kernels.affine(x, rotation=20.0, translation=0.1, scale=0.1, shear=5.0, interpolation=interpolation,
                           seed=5)
    return call


def cases(full: bool = False) -> List[Tuple[str, Callable[[], None]]]:
    """(name, call) of every recorded call (the same list whether or not ``full``: the fast subset is chosen
    among the compile jobs, :func:`select`)."""
    out = []
    for name, dt, tf32 in MATMUL_DTYPES:
        for lam in ("example", "shared", "none"):
            for bias in (True, False):
                out.append((f"linear {name} λ={lam} bias={bias}", linear_case(dt, tf32, lam, bias)))
        out.append((f"linear {name} odd sizes", linear_case(dt, tf32, M=37, N=50, K=23)))
        out.append((f"linear {name} split-K", linear_case(dt, tf32, M=40, N=1040, K=48)))
        out.append((f"linear {name} chunked rows", linear_case(dt, tf32, M=1200, N=48, K=32)))
        if dt != F32:
            out.append((f"linear {name} fp32 λ", linear_case(dt, tf32, lam_dtype=F32)))
        for lam in ("example", "shared", "none"):
            out.append((f"lstm {name} λ={lam}", lstm_case(dt, tf32, lam)))
        out.append((f"lstm {name} no bias, no hx", lstm_case(dt, tf32, bias=False, hx=False)))
        out.append((f"lstm {name} B=32 N=64 2 layers", lstm_case(dt, tf32, B=32, N=64, layers=2)))
    for name, dt in (("fp16", F16), ("bf16", BF16), ("fp32", F32)):
        for lam in ("example", "shared"):
            for bias in (True, False):
                out.append((f"conv {name} λ={lam} bias={bias}", conv_case(dt, lam, bias)))
        out.append((f"conv {name} two-conv", conv_case(dt, packed=False)))
        out.append((f"conv {name} channels_last", conv_case(dt, channels_last=True)))
        out.append((f"conv {name} groups=2 channels_last two-conv",
                    conv_case(dt, packed=False, channels_last=True, groups=2)))
        out.append((f"conv {name} 96 channels", conv_case(dt, cin=16, cout=96, hw=9)))
        for lam in ("example", "shared", "none"):
            out.append((f"embedding {name} λ={lam}", embedding_case(dt, lam)))
        out.append((f"embedding {name} sorted", embedding_case(dt, sorted_grad=True, D=48)))
    for name, dt in (("fp16", F16), ("bf16", BF16), ("fp32", F32), ("fp64", F64)):
        out.append((f"dropout {name}", dropout_case(dt)))
        out.append((f"dropout {name} per channel", dropout_case(dt, per_channel=True)))
        out.append((f"augment {name}", augment_case(dt)))
        out.append((f"augment {name} no jitter", augment_case(dt, jitter=False)))
        out.append((f"affine {name} nearest", affine_case(dt)))
        out.append((f"affine {name} bilinear", affine_case(dt, "bilinear")))
    out.append(("augment grey cutout", augment_case(F32, jitter=False, channels=1)))
    out.append(("augment uint8", augment_case(F32, uint8=True)))
    out.append(("affine uint8 bilinear", affine_case(F32, "bilinear", uint8=True)))
    return out


def _consts(job) -> dict:
    return {job.names[k]: v for k, v in job.constexprs.items() if k in job.names}


def _dot_class(job) -> str:
    """"half" (fp16 / bf16), "tf32" (fp32, TF32 dots or no dot precision), "ieee" (fp32 with TF32 off), "fp64"."""
    prec = _consts(job).get("PREC", _consts(job).get("LAM_PREC", ""))
    dtype = next(t for t in job.signature.values() if str(t).startswith("*"))
    if prec == "ieee":
        return "ieee"
    return {"*fp32": "tf32", "*fp64": "fp64"}.get(dtype, "half")


def _preference(job) -> tuple:
    """The widest variant first (the most flags on, then the most 16-divisible arguments), half precision in
    fp16 on sm_90 and bf16 on sm_80 (both dtypes covered, each on one target)."""
    dtype = next(t for t in job.signature.values() if str(t).startswith("*"))
    return (dtype == ("*fp16" if job.arch == 90 else "*bf16"), sum(v is True for v in _consts(job).values()),
            sum(bool(a) for a in job.attrs.values()))


def _risk(job) -> tuple:
    """(per-thread tile elements: accumulators and dot operands; pipelined tile elements) of a kept config."""
    blocks = [v for k, v in _consts(job).items() if k.startswith("BLOCK") and k != "BLOCK_H"]
    a, b, c = blocks[:3]
    warps, stages = job.options["num_warps"], job.options["num_stages"]
    return ((a * b * 8 + (a + b) * c) / (32 * warps), (a * c + b * c) * stages)


def _full(jobs: Sequence) -> list:
    """Every job, except that of the jobs that differ only in which arguments are 16-divisible (the pointers of
    per-step views, odd sizes) the most and the least aligned are kept."""
    groups = {}
    for job in jobs:
        key = repr((job.key, job.arch, job.signature, sorted(job.constexprs.items(), key=str),
                    job.options["num_warps"], job.options["num_stages"]))
        groups.setdefault(key, []).append(job)
    out = []
    for group in groups.values():
        aligned = sorted(group, key=lambda j: sum(bool(a) for a in j.attrs.values()))
        out += [aligned[-1]] + ([aligned[0]] if len(aligned) > 1 and aligned[0].attrs != aligned[-1].attrs else [])
    return out


def select(jobs: Sequence, full: bool = False) -> list:
    """The jobs to compile. ``full``: every job (:func:`_full`). Else the fast subset of ``make test``: per
    kernel, target and dot class the widest variant (:func:`_preference`) at the config it launches without
    autotuning, and for the autotuned kernels that variant's riskiest kept config in registers (the most tile
    elements per thread) and, on sm_80 (the smaller shared memory), in shared memory (the most pipelined tile
    elements)."""
    if full:
        return _full(jobs)
    widest = {}
    for job in jobs:
        group = (job.key, job.arch, _dot_class(job))
        if group not in widest or _preference(job) > _preference(widest[group]):
            widest[group] = job
    variants = {job.variant for job in widest.values()}
    chosen = [job for job in jobs if job.config != "kept" and job.variant in variants]
    risky = {}
    for job in jobs:
        if job.config != "kept" or job.variant not in variants:
            continue
        for i in (0, 1) if job.arch == 80 else (0,):
            group = (job.key, job.arch, _dot_class(job), i)
            if group not in risky or _risk(job)[i] > _risk(risky[group])[i]:
                risky[group] = job
    return chosen + [job for job in risky.values() if job not in chosen]
