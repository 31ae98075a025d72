"""BucketTables: one sigma bucket's skip lists on one device, kept bit-packed, each layer's table built when it runs.

A layer's padded table ([H, nq, W] key-block indices, W its longest row) is what the Triton kernel walks. Holding
every layer's table for a bucket costs L * H * nq * W * 2 bytes: at Wan 14B 720p (40 layers, 40 heads, 591 x 591
blocks) about 1.1 GB per bucket, and two buckets were kept (measured: a 720p step's peak grew by 2.1-3.1 GB, 11 % of
the 28 GB of weights). The packed masks of the same bucket are 16x smaller (70 MB), and building one layer's table
from them is one small launch (kernels/tables/triton_build.py) that reads 1.8 MB and writes at most 28 MB, nothing next
to the layer's attention (~160 ms at density 0.35, batch 2). So a bucket keeps its packed masks on the device,
and `layer(l)` rebuilds layer l's table right before its call into one buffer that every layer reuses ("streamed";
~100 MB held at 720p in all).

The kernel that reads a table and the builder that next overwrites it are queued on the same CUDA stream, so the
reuse needs no sync. A call on another stream first makes that stream wait for the last one (stream-ordered too).
A LayerSkipList that `layer()` returns is valid until the next `layer()` call.

When a whole bucket's tables are small (under RESIDENT_BYTES: the tiny models, small latents) every layer's table
is built once, on first use, and kept ("resident"): there a launch per call would be a visible share of a call's
host time, and the memory does not matter.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ...masks.skiplists import LayerSkipList, index_dtype, row_tables
from .naive import packed_to_table
from ...masks.transfer import canonical_device, to_device_async
from ..support import KernelHealth

# A bucket whose tables (every layer, mixed layers' full-head variants included) take at most this many bytes keeps
# them ("resident"); above it one buffer is rebuilt per call ("streamed"). 32 MiB: Wan 1.3B at 480p (30 layers,
# 12 heads, 256 x 256 blocks) needs up to 47 MB and streams; the tiny test models need kilobytes.
RESIDENT_BYTES = 32 << 20



class BucketTables:
    """Skip lists of one bucket on one device.

    full_heads: optional [L, H] bool (host): heads that list every key block in layer l's table when asked for
    `layer(l, full=True)` (the runner's mixed layers on the Triton path: exact dense heads in the sparse launch).
    layers: the layers that will be asked for (default: all); the others' masks are not copied to the device (the
    runner leaves out layers it routes dense).
    builder: "triton", "torch" or None (Triton on CUDA, torch elsewhere).
    mode: "streamed", "resident" or None (by RESIDENT_BYTES).
    health: the runner's record of Triton paths that failed on this GPU (kernels/support.py)."""

    def __init__(self, bundle, bucket: int, device, *, full_heads: Optional[torch.Tensor] = None, layers=None,
                 builder: Optional[str] = None, mode: Optional[str] = None,
                 health: Optional[KernelHealth] = None):
        device = canonical_device(device)
        self._health = health if health is not None else KernelHealth()
        g = bundle.geometry
        self.geometry = g
        self.device = device
        self.bucket = bucket
        self.num_heads = H = bundle.num_heads
        L = bundle.num_layers
        layers = list(range(L)) if layers is None else sorted(set(int(l) for l in layers))
        self._slot = {l: i for i, l in enumerate(layers)}  # layer -> row of the packed masks on the device
        self._dtype = index_dtype(g.nk)
        widths = bundle.layer_widths(bucket)
        full_heads = (torch.zeros(L, H, dtype=torch.bool) if full_heads is None
                      else full_heads.to(torch.bool).cpu())
        self._full_any = full_heads.any(-1).tolist()
        # Per (layer, full) the table width: the longest row, or every key block when a head lists them all.
        self._width = {}
        for l in layers:
            self._width[(l, False)] = max(1, int(widths[l]))
            self._width[(l, True)] = g.nk if self._full_any[l] else max(1, int(widths[l]))
        per_table = H * g.nq * self._dtype.itemsize
        total = sum(per_table * self._width[(l, f)] for l in layers for f in ((False, True) if self._full_any[l]
                                                                                 else (False,)))
        self.mode = mode or ("resident" if total <= RESIDENT_BYTES else "streamed")
        if self.mode not in ("resident", "streamed"):
            raise ValueError(f"mode must be 'resident' or 'streamed', got {mode!r}")
        # One pinned copy each for the bucket's packed masks and the full-head flags: no host stall.
        self._packed = to_device_async(bundle.bucket_masks(bucket, layers).contiguous(), device) if layers else None
        self._full = (to_device_async(full_heads.to(torch.uint8), device) if any(self._full_any) else None)
        self._rep = bundle.repetition_plan(bucket)
        self._full_host = full_heads
        self._max_width = max(self._width.values(), default=1)
        self._buffer = None  # streamed: [H * nq * max width] indices, + [H, nq] counts
        self._counts = None
        self._shells: dict = {}  # (layer, full) -> LayerSkipList (views into the buffer when streamed)
        self._built: set = set()  # resident: (layer, full) whose table is built
        self._current = None  # streamed: (layer, full) the buffer holds now
        self._stream = None
        if builder is None:
            builder = "triton" if device.type == "cuda" else "torch"
        if builder not in ("triton", "torch"):
            raise ValueError(f"builder must be 'triton' or 'torch', got {builder!r}")
        self.builder = builder

    # ---- public ---------------------------------------------------------------------------------------------
    def layer(self, layer: int, full: bool = False) -> LayerSkipList:
        """Layer `layer`'s skip list, its table built now (streamed) or on first use (resident). full=True: the
        heads marked in full_heads list every key block and are not repetitive."""
        full = bool(full) and bool(self._full_any[layer])
        key = (layer, full)
        if layer not in self._slot:
            raise KeyError(f"layer {layer} was not prepared for this bucket (routed dense)")
        shell = self._shells.get(key)
        if shell is None:
            shell = self._shells[key] = self._make_shell(layer, full)
        self._order_after_last_stream()
        if self.mode == "resident":
            if key not in self._built:
                self._build(layer, full, shell)
                self._built.add(key)
        else:
            if self._current != key:
                self._build(layer, full, shell)
                self._current = key
        return shell

    def held_bytes(self, extra=()) -> int:
        """Bytes of the device tensors this object keeps (packed masks, flags, tables or the buffer, repetition
        plans and the kernel's row tables of each layer) and of `extra` tensors on its device,
        each storage counted once."""
        seen: dict = {}

        def add(t):
            if isinstance(t, torch.Tensor) and t.device == self.device:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()

        for t in (self._packed, self._full, self._buffer, self._counts, *extra):
            add(t)
        for shell in self._shells.values():
            add(shell.kv_indices)
            add(shell.kv_counts)
            rep = shell.repetition
            if rep is not None:
                for t in (rep.head_slot, rep.anchors, rep.row_anchor):
                    add(t)
            for t in shell.rows.tensors() if shell.rows is not None else ():
                add(t)
        return sum(seen.values())

    # ---- internals --------------------------------------------------------------------------------------------
    def _make_shell(self, layer: int, full: bool) -> LayerSkipList:
        g, H = self.geometry, self.num_heads
        W = self._width[(layer, full)]
        if self.mode == "streamed":
            if self._buffer is None:
                self._buffer = torch.empty(H * g.nq * self._max_width, dtype=self._dtype, device=self.device)
                self._counts = torch.empty(H, g.nq, dtype=torch.int32, device=self.device)
            idx = self._buffer[:H * g.nq * W].view(H, g.nq, W)
            cnt = self._counts
        else:
            idx = torch.empty(H, g.nq, W, dtype=self._dtype, device=self.device)
            cnt = torch.empty(H, g.nq, dtype=torch.int32, device=self.device)
        rep = self._rep.for_layer(layer) if self._rep is not None else None
        if rep is not None and full:
            rep = rep.without_heads(self._full_host[layer])
            if not bool((rep.head_slot >= 0).any()):
                rep = None
        if rep is not None:
            rep = rep.to(self.device)  # keeps the host plan: the kernel reads which heads repeat from there
        # Made once per (bucket, layer), kept with the shell: the kernel reads them at every call.
        return LayerSkipList(self.geometry, idx, cnt, rep, row_tables(self.geometry, H, rep, self.device))

    def _build(self, layer: int, full: bool, shell: LayerSkipList):
        packed = self._packed[self._slot[layer]]
        flags = self._full[layer] if full else None
        key = ("table builder", str(self.device))
        if self.builder == "triton" and self._health.ok(key):
            try:
                from .triton_build import packed_to_table_triton
                packed_to_table_triton(packed, self.geometry.nk, shell.kv_indices, shell.kv_counts, flags)
                return
            except Exception as e:  # noqa: BLE001 - a compile failure on an untested GPU must not stop sampling
                self._health.mark_failed(key)
                warnings.warn(f"calibatt: the Triton skip-list builder failed on {self.device} ({e}); building "
                              "tables with torch ops from now on", RuntimeWarning)
        idx, cnt = packed_to_table(packed, self.geometry.nk, shell.kv_indices.shape[-1], flags)
        shell.kv_indices.copy_(idx)
        shell.kv_counts.copy_(cnt)

    def _order_after_last_stream(self):
        # The buffer is reused by every layer: a build on another stream than the last reader's must wait for it
        # (and a read of a resident table, for the stream that built it).
        if self.device.type != "cuda":
            return
        stream = torch.cuda.current_stream(self.device)
        if self._stream is not None and stream != self._stream:
            stream.wait_stream(self._stream)
            self._current = None
        self._stream = stream

