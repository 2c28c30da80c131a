"""No host synchronisation on the CUDA paths, checked without a GPU.

Every layer's forward and backward (and per_example_dropout) runs on *fake* CUDA tensors: under
``torch._subclasses.fake_tensor.FakeTensorMode`` ``torch.empty(..., device="cuda")`` makes a tensor with
metadata only (shape, dtype, device cuda:0), which works on a machine without a GPU, and every op runs
its fake kernel. Reading a value on the host (``.item()``, ``int()``, ``bool()``, ``.tolist()``: what
makes the host wait for the device) raises ``DataDependentOutputException`` there. On top of it,
:class:`_CopyWatch` records the copies between host and device that would block the host (a
device-to-host copy, or a host-to-device copy without ``non_blocking``), which the fake mode lets pass.

The backends are those the registry picks on CUDA (``auto``: triton for hyper_linear, the reference
for the other ops) and each one that can run the op (``triton``; ``cuda`` for hyper_linear), with the
availability checks patched so that the CUDA path is taken. Triton kernel launches are replaced by a
stub that records them (their arguments must be fake CUDA tensors): everything the host does around
them runs. ``test_the_harness_catches_a_sync`` shows that the harness fails a function that syncs.
"""

import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import stn_kernels
from stn_kernels.backends import registry

pytest.importorskip("triton")
# The Triton conv backend keys its packed-weight cache on data_ptr(), which fake tensors warn about (no sync).
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")

aten = torch.ops.aten


class _CopyWatch(TorchDispatchMode):
    """Records blocking copies between host and device (under the fake mode, which lets them pass)."""

    def __init__(self):
        super().__init__()
        self.blocking = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[0] if func is aten._to_copy.default else args[1]
            dst = kwargs.get("device") if func is aten._to_copy.default else args[0].device
            dst = src.device if dst is None else torch.device(dst)
            if isinstance(src, torch.Tensor) and {src.device.type, dst.type} == {"cpu", "cuda"}:
                if dst.type == "cpu" or not kwargs.get("non_blocking", False):
                    self.blocking.append(f"{func}: {src.device} -> {dst}")
        return func(*args, **kwargs)


@pytest.fixture
def noted_inputs(monkeypatch):
    """The node of an autograd.Function has edges for its tensor inputs only, while its backward returns one
    entry per input: which inputs were tensors is noted on the node, for _backward."""
    function_apply = torch.autograd.Function.__dict__["apply"]  # a C classmethod descriptor

    def apply(cls, *args, **kwargs):
        out = function_apply.__get__(None, cls)(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        if isinstance(first, torch.Tensor) and first.grad_fn is not None:
            first.grad_fn.tensor_inputs = [isinstance(a, torch.Tensor) for a in args]
        return out

    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(apply))


@pytest.fixture
def fake_cuda(monkeypatch, noted_inputs):
    """Yields (launches, copy watch); inside, tensors made on "cuda" are fake and the CUDA paths are taken."""
    import triton.runtime.jit as triton_jit

    from stn_kernels.backends import cuda as cuda_backend
    from stn_kernels.backends.triton import hyper_conv2d, hyper_embedding, hyper_linear, hyper_lstm_recurrence

    launches = []

    def launch(self, grid):
        def run(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            assert tensors and all(isinstance(t, FakeTensor) and t.device.type == "cuda" for t in tensors), \
                [(type(t).__name__, t.device) for t in tensors]
            launches.append(getattr(self, "__name__", type(self).__name__))
        return run

    monkeypatch.setattr(triton_jit.KernelInterface, "__getitem__", launch)
    monkeypatch.setattr(registry, "triton_importable", lambda: True)
    monkeypatch.setattr(registry, "cuda_extension_available", lambda device: device.type == "cuda")
    monkeypatch.setattr(cuda_backend, "_require", lambda x: None)
    for module in (hyper_conv2d, hyper_embedding, hyper_linear):
        monkeypatch.setattr(module, "_num_sms", lambda device: 132)
    monkeypatch.setattr(hyper_linear, "_max_shared", lambda index: 232448)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert hyper_lstm_recurrence  # imported so that its first use inside the fake mode imports nothing
    watch = _CopyWatch()
    with FakeTensorMode(), watch:
        yield launches, watch


def _backward(out, grad, inputs):
    """torch.autograd.grad(out, inputs, grad) run node by node on this thread.

    The autograd engine runs the backward of CUDA tensors on a device thread, which initialises the CUDA
    context (impossible without a GPU, fake tensors or not); calling each node of the graph here runs the
    same backward functions (ours and torch's), in topological order."""
    order, seen = [], set()

    def visit(node):  # depth-first post-order: a node after everything it feeds
        if node is None or node in seen:
            return
        seen.add(node)
        for child, _ in node.next_functions:
            visit(child)
        order.append(node)

    visit(out.grad_fn)
    pending = {out.grad_fn: [grad]}
    found = {}
    for node in reversed(order):
        grads = pending.pop(node, None)
        if grads is None:
            continue
        # What the engine does between nodes: reduce a broadcast gradient to the shape the node expects.
        # A node with several outputs (the host LSTM loop returns out, h and c) takes one gradient per output,
        # None for those nothing used.
        grads = grads + [None] * (len(node._input_metadata) - len(grads))
        grads = [g if g is None or tuple(g.shape) == tuple(m.shape) else g.sum_to_size(m.shape)
                 for g, m in zip(grads, node._input_metadata)]
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            found[node.variable] = grads[0]
            continue
        with torch.no_grad():  # as the engine runs a backward (no create_graph)
            if hasattr(node, "_forward_cls"):  # a Python autograd.Function: its backward, through apply
                arity = len(inspect.signature(node._forward_cls.backward).parameters) - 1
                results = node.apply(*grads, *[None] * (arity - len(grads)))
                results = [r for r, tensor in zip(results, node.tensor_inputs) if tensor]
            else:
                results = node(*grads)
        results = results if isinstance(results, (tuple, list)) else (results,)
        for (child, slot), g in zip(node.next_functions, results):
            if child is None or g is None:
                continue
            slots = pending.setdefault(child, [None] * max(slot + 1, 1))
            slots.extend([None] * (slot + 1 - len(slots)))
            slots[slot] = g if slots[slot] is None else slots[slot] + g
    return [found.get(t) for t in inputs]


def _cuda(*size, grad=True):
    return torch.randn(size, device="cuda").requires_grad_(grad)


def _run_linear():
    layer = stn_kernels.HyperLinear(16, 12, num_hparams=3, device="cuda")
    x, lam = _cuda(8, 16), _cuda(8, 3)
    return layer(x, lam), [x, lam, *layer.parameters()]


def _run_linear_functional():  # the public function (the module's fast path aside), 3-D input
    layer = stn_kernels.HyperLinear(16, 12, num_hparams=3, device="cuda")
    x, lam = _cuda(8, 2, 16), _cuda(8, 3)
    V, C = layer.hparam_weight.chunk(2)
    out = stn_kernels.hyper_linear(x, lam, layer.weight, layer.hyper_weight, layer.bias, layer.hyper_bias, V, C)
    return out, [x, lam, *layer.parameters()]


def _run_conv2d():
    layer = stn_kernels.HyperConv2d(3, 8, 3, num_hparams=3, padding=1, device="cuda")
    x, lam = _cuda(4, 3, 8, 8), _cuda(4, 3)
    return layer(x, lam), [x, lam, *layer.parameters()]


def _run_embedding():
    layer = stn_kernels.HyperEmbedding(50, 16, num_hparams=3, device="cuda")
    tokens = torch.randint(0, 50, (4, 8), device="cuda")
    lam = _cuda(8, 3)
    return layer(tokens, lam, batch_dim=1), [lam, *layer.parameters()]


def _run_lstm_step():
    cell = stn_kernels.HyperLSTMCell(16, 16, num_hparams=3, device="cuda")
    x, lam = _cuda(1, 8, 16), _cuda(8, 3)
    h, c = _cuda(1, 8, 16, grad=False), _cuda(1, 8, 16, grad=False)
    out, _ = cell(x, (h, c), lam)
    return out, [x, lam, *cell.parameters()]


def _run_lstm_stack():  # two layers, DropConnect and per-example locked dropout between them
    lstm = stn_kernels.HyperLSTM(16, 16, 2, num_hparams=3, dropconnect=0.3, device="cuda")
    x, lam = _cuda(5, 8, 16), _cuda(8, 3)
    out, _ = lstm(x, None, lam, layer_dropout=torch.rand(8, device="cuda") * 0.5)
    return out, [x, lam, *lstm.parameters()]


def _run_dropout():
    x = _cuda(8, 4, 5, 5)
    out = stn_kernels.stn.per_example_channel_dropout(x, torch.rand(8, device="cuda") * 0.5, seed=123)
    out = stn_kernels.stn.per_example_dropout(out, 0.25, seed=torch.tensor(7))
    return stn_kernels.stn.per_example_dropout(out, torch.rand(8, device="cuda") * 0.5), [x]


RUNS = {"linear": _run_linear, "linear-functional": _run_linear_functional, "conv2d": _run_conv2d,
        "embedding": _run_embedding, "lstm-step": _run_lstm_step, "lstm-stack": _run_lstm_stack,
        "dropout": _run_dropout}
# The backends each op can run on CUDA; "auto" is what the registry picks there.
BACKENDS = {"linear": ("auto", "triton", "cuda", "reference"), "linear-functional": ("auto", "triton", "cuda"),
            "conv2d": ("auto", "triton"), "embedding": ("auto", "triton"), "lstm-step": ("auto", "triton"),
            "lstm-stack": ("auto", "triton"), "dropout": ("auto", "triton")}
CASES = [(run, backend) for run, backends in BACKENDS.items() for backend in backends]


@pytest.mark.parametrize("run, backend", CASES, ids=[f"{r}-{b}" for r, b in CASES])
def test_forward_and_backward_do_not_sync(fake_cuda, run, backend):
    launches, watch = fake_cuda
    with stn_kernels.use_backend(backend):
        out, inputs = RUNS[run]()
        assert isinstance(out, FakeTensor) and out.device.type == "cuda"
        grads = _backward(out, torch.ones_like(out), inputs)
        assert any(g is not None for g in grads)
        with torch.no_grad():
            RUNS[run]()
    assert not watch.blocking, watch.blocking
    # The Triton path was taken (its launches ran), and only there: on auto, hyper_linear's (also the LSTM's
    # input projection) and no other op's.
    triton = backend == "triton" or (backend == "auto" and run.startswith(("linear", "lstm")))
    assert bool(launches) == triton, launches


def test_the_harness_catches_a_sync(fake_cuda):
    """What the harness is for: the host reading a device value, or a blocking copy, does not pass."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    _, watch = fake_cuda
    indices = torch.randint(0, 50, (4, 8), device="cuda")
    for read in (lambda: int(indices.max()), lambda: indices.sum().item(), lambda: bool((indices >= 0).all()),
                 lambda: indices.tolist()):
        with pytest.raises(DataDependentOutputException):
            read()
    assert not watch.blocking
    indices.cpu()
    torch.tensor([1, 2]).to("cuda")
    assert len(watch.blocking) == 2, watch.blocking
    torch.tensor([1, 2]).to("cuda", non_blocking=True)
    assert len(watch.blocking) == 2, watch.blocking


def test_the_old_index_check_fails_the_harness_and_the_new_one_passes(fake_cuda):
    """hyper_embedding used to check its indices with int(input.min()) on every device (a sync on CUDA); it
    now asserts on the device there, and keeps the ValueError with the range found on the CPU."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from stn_kernels._validation import check_indices

    def old_check(input, num_embeddings):
        low, high = int(input.min()), int(input.max())
        if low < 0 or high >= num_embeddings:
            raise ValueError("out of range")

    indices = torch.randint(0, 50, (4, 8), device="cuda")
    with pytest.raises(DataDependentOutputException):
        old_check(indices, 50)
    check_indices(indices, 50)


def test_the_node_by_node_backward_is_autograds(noted_inputs):
    """_backward (what the fake-CUDA tests differentiate with) gives torch.autograd.grad's gradients, on real
    CPU tensors, through a Function with non-tensor inputs, broadcasts and the LSTM's two-output op."""
    torch.manual_seed(0)
    embed = stn_kernels.HyperEmbedding(20, 8, num_hparams=3)
    lstm = stn_kernels.HyperLSTM(8, 6, 2, num_hparams=3)
    head = stn_kernels.HyperLinear(6, 4, num_hparams=3)
    tokens, lam = torch.randint(0, 20, (5, 4)), torch.randn(4, 3, requires_grad=True)
    out = head(lstm(embed(tokens, lam, batch_dim=1), None, lam)[0].transpose(0, 1), lam)
    inputs = [lam, *embed.parameters(), *lstm.parameters(), *head.parameters()]
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    for got, want in zip(_backward(out, grad, inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
