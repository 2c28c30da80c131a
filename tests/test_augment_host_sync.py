"""No host synchronisation in the augmentation's reference (what ``auto`` runs on CUDA unless Triton is
asked for): the draws and the forward on fake CUDA tensors (FakeTensorMode: any read of a tensor's
values, ``.item()``, ``bool(t)``, ``nonzero``, boolean indexing, raises), with no tensor copied from the
host to the device either (a blocking copy waits for the stream); the backward on meta tensors (the
autograd engine needs a real device for fake CUDA ones). On CPU tensors (outside torch.compile) the
reference reads the order on the host, where that is free (tests/test_augment.py pins both paths to
the same bits). Before the fix, the reference applied each jitter stage
to ``nonzero`` rows of the batch and asked ``bool((order >= 0).any())``: both raise here."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import stn_kernels
from stn_kernels import reference_augment


class _NoHostToDevice(TorchDispatchMode):
    """Raises on an op that takes a CPU tensor with elements and returns a CUDA tensor (a host to
    device copy); 0-d CPU tensors are scalars the kernels take by value."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        host = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        if any(t.dim() > 0 for t in host) and any(
                isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tree_leaves(out)):
            raise AssertionError(f"host to device copy in {func}")
        return out


def _strengths(batch, device):
    s = torch.full((batch,), 0.25, device=device)
    return dict(brightness=s, contrast=s, saturation=s, hue=s, holes=s, length=s, scale=s)


@pytest.mark.parametrize("random_order", [True, False])
def test_reference_draws_and_forward_never_read_device_values(random_order):
    batch, height, width = 5, 7, 9
    with FakeTensorMode(), _NoHostToDevice():
        images = torch.empty(batch, 3, height, width, device="cuda")
        seed_offset = torch.empty(2, dtype=torch.int64, device="cuda")
        d = reference_augment.draw(batch, height, width, seed_offset, max_holes=2, random_order=random_order,
                                   **_strengths(batch, "cuda"))
        out = reference_augment.augment_forward(images, d.order, d.factors, d.boxes, d.scales)
        assert out.shape == images.shape and out.device.type == "cuda"


def test_public_function_on_the_reference_backend_never_reads_device_values():
    batch = 4
    with stn_kernels.use_backend("reference"), FakeTensorMode(), _NoHostToDevice():
        images = torch.empty(batch, 3, 6, 5, device="cuda").contiguous(memory_format=torch.channels_last)
        seed = torch.empty((), dtype=torch.int64, device="cuda")  # an int seed is copied from the host
        out = stn_kernels.augment_images(images, max_holes=3, seed=seed, **_strengths(batch, "cuda"))
        assert out.shape == images.shape


def test_reference_backward_never_reads_values():
    # On meta tensors (no values: any read raises), which take the accelerator path as CUDA does; the
    # autograd engine needs a real device for fake CUDA tensors.
    batch, height, width = 3, 4, 5
    d = reference_augment.draw(batch, height, width, torch.tensor([3, 0]), max_holes=2,
                               **_strengths(batch, "cpu"))
    operands = [t.to("meta") for t in (d.order, d.factors, d.boxes, d.scales)]
    images = torch.empty(batch, 3, height, width, device="meta")
    grad = reference_augment.augment_backward(torch.empty_like(images), images, *operands)
    assert grad.shape == images.shape and grad.device.type == "meta"


def test_the_check_catches_a_host_synchronisation():
    # The test's own control: the old reference's reads raise here.
    with FakeTensorMode():
        order = torch.empty(4, 4, dtype=torch.int64)
        with pytest.raises(Exception, match="local_scalar_dense|nonzero|dynamic"):
            bool((order >= 0).any())
        with pytest.raises(Exception, match="nonzero|dynamic|data.dependent"):
            (order[:, 0] == 1).nonzero()
    with pytest.raises(Exception, match="meta"):
        torch.empty(3, device="meta").sum().item()
    with FakeTensorMode(), _NoHostToDevice(), pytest.raises(AssertionError, match="host to device"):
        torch.tensor([[0, 1], [2, 3]], device="cuda")


@pytest.mark.parametrize("mode", [0, 1])
def test_affine_reference_never_reads_device_values(mode):
    from stn_kernels import reference_affine

    batch, height, width = 4, 7, 9
    with FakeTensorMode(), _NoHostToDevice():
        images = torch.empty(batch, 2, height, width, device="cuda")
        s = torch.full((batch,), 0.25, device="cuda")
        seed_offset = torch.empty(2, dtype=torch.int64, device="cuda")
        d = reference_affine.draw(batch, height, width, seed_offset, rotation=s, translation=s, scale=s, shear=s)
        out = reference_affine.affine_forward(images, d.matrices, mode)
        assert out.shape == images.shape and out.device.type == "cuda"
    s = torch.full((batch,), 0.25)
    d = reference_affine.draw(batch, height, width, torch.tensor([1, 0]), rotation=s, translation=s, scale=s, shear=s)
    meta = torch.empty(batch, 2, height, width, device="meta")
    grad = reference_affine.affine_backward(torch.empty_like(meta), meta, d.matrices.to("meta"), mode)
    assert grad.shape == meta.shape
