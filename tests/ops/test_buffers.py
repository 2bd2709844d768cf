"""The cpp backend's recycled output buffers: reused only when nothing holds them."""

import pytest
import torch

import promptbake
from promptbake.ops import _buffers, _dispatch

pytestmark = pytest.mark.skipif(_dispatch.compiled() is None, reason="compiled module not built")
BIG = (256, 16384)  # 16 MiB of fp32: above the pool's threshold


def test_recycled_only_after_every_view_is_gone():
    promptbake.ops.empty_cache()
    a = _buffers.cpu_empty(BIG, torch.float32)
    address, view = a.data_ptr(), a[5:]
    del a
    b = _buffers.cpu_empty(BIG, torch.float32)
    assert b.data_ptr() != address  # a view still holds the first buffer
    del view
    c = _buffers.cpu_empty(BIG, torch.float32)
    assert c.data_ptr() == address
    assert c.shape == BIG and c.dtype == torch.float32 and c.is_contiguous()
    del b, c
    assert promptbake.ops.empty_cache() >= 2 * BIG[0] * BIG[1] * 4
    assert _dispatch.compiled().pool_mapped_bytes() == 0


def test_small_buffers_use_the_ordinary_allocator():
    x = _buffers.cpu_empty((4, 100), torch.bfloat16)
    assert x.shape == (4, 100) and x.dtype == torch.bfloat16


def test_reused_gradient_buffer_is_fully_rewritten():
    # The second call gets the first call's buffer, full of its values: masked rows must be
    # zeroed and every other entry recomputed.
    s = torch.randn(*BIG) * 3
    t = torch.randn(*BIG) * 3
    mask = torch.rand(BIG[0]) < 0.5
    addresses = []
    for attempt in range(2):
        x = s.clone().requires_grad_(True)
        promptbake.divergence(x, t, mask=mask, backend="cpp").backward()
        addresses.append(x.grad.data_ptr())
        if attempt == 0:
            expected = x.grad.clone()
            x.grad.fill_(123.0)  # stale garbage for the next call to overwrite
        else:
            torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
        del x
    assert addresses[0] == addresses[1]
    assert (expected[~mask] == 0).all()
