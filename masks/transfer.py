"""Host-to-device copies that do not stall the host.

A copy from ordinary (pageable) host memory makes the host wait for the GPU stream to drain first. Skip lists and
routing tables are built when a sigma bucket begins, between the model's launches, so such a wait empties the GPU's
queue once per bucket; at the tiny models' size that bubble costs as much as a step's attention. Copies from
pinned memory are queued like kernels.
"""

from __future__ import annotations

import torch


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`; CPU -> CUDA goes through pinned memory without blocking the host (the caching host
    allocator keeps the pinned buffer alive until the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def canonical_device(device) -> torch.device:
    """`device` with its index: "cuda" is the current CUDA device, so that it compares equal to a tensor's device
    (torch.device("cuda") != torch.device("cuda:0"))."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
