"""Host-to-device copies used when a sigma bucket begins (masks/transfer.py) and the per-device constant of
unpack_bits: same values, and the copies that must not stall the host really are asynchronous on CUDA."""

import pytest
import torch

from calibatt.masks import packing
from calibatt.masks.packing import pack_bits, unpack_bits
from calibatt.masks.transfer import to_device_async


def test_cpu_target_keeps_values():
    t = torch.randint(0, 255, (3, 7), dtype=torch.uint8)
    out = to_device_async(t, "cpu")
    assert out.device.type == "cpu" and torch.equal(out, t)


def test_unpack_round_trip_after_the_constant_is_cached():
    key = (id(packing._SHIFTS), "cpu")
    packing._DEVICE_COPIES.pop(key, None)
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(2, 4, 5, generator=gen) < 0.5
    assert torch.equal(unpack_bits(pack_bits(m), 5), m)  # first call: copies the constant
    cached = packing._DEVICE_COPIES[key]
    assert torch.equal(cached, packing._SHIFTS)
    copies = len(packing._DEVICE_COPIES)
    for nk in (5, 8, 13):
        m = torch.rand(2, 4, nk, generator=gen) < 0.5
        assert torch.equal(unpack_bits(pack_bits(m), nk), m)
    # Later calls used that one copy: no new entry, the same tensor object.
    assert len(packing._DEVICE_COPIES) == copies and packing._DEVICE_COPIES[key] is cached
    assert packing._on(packing._SHIFTS, "cpu") is cached


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned, asynchronous copies)")
def test_cuda_copy_is_asynchronous_and_exact():
    t = torch.randint(0, 255, (64, 1024), dtype=torch.uint8)
    unpack_bits(torch.zeros(1, 1, dtype=torch.uint8, device="cuda"), 8)  # the constant's one copy per device
    torch.cuda.set_sync_debug_mode("error")  # a synchronising copy raises here
    try:
        out = to_device_async(t, "cuda")
        bits = unpack_bits(out, 8 * 1024)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.is_cuda and torch.equal(out.cpu(), t)
    assert bits.shape == (64, 8192)
