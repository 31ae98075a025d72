"""Calibrated sparse attention inside yunchang's USP (Ulysses + Ring), the sequence parallelism xDiT (xfuser) uses.

The seam. yunchang's `LongContextAttention.forward` (and xfuser's `xFuserLongContextAttention`, its subclass) runs
the Ulysses all-to-all (each rank: its ring chunk of the sequence, H / U heads) and then calls the instance
attribute `ring_attn_fn(q, k, v, ..., softmax_scale=, group=ring_pg, ...)` with q, k, v of shape (B, S / R, H / U,
D); `UlyssesAttention.forward` calls `attn_fn(q, k, v, ..., softmax_scale=)` the same way with the whole sequence.
Both are plain attributes set in __init__, so `install` replaces them on one module instance (nothing in yunchang is
edited or copied) with `ring_attn_fn` below, which runs our skip lists on the heads this rank holds:
  - the heads: before yunchang's all-to-all, `attention` reorders q, k, v's heads into the balanced assignment's
    slot order (parallel/heads.py: LPT on the calibrated costs, ceil(H / U) slots per rank, zero padding heads
    when U does not divide H), so yunchang's contiguous head split hands each rank the heads we chose; the output
    is put back in the model's head order after. Padding slots are never computed.
  - the sequence: with R = 1 every rank holds the whole sequence and runs the reference on its heads' skip list;
    with R > 1 (USP hybrid / pure ring) it runs parallel/ring.py on its chunk, ring rank = chunk index.
Contract (checked where it can be): the model splits the sequence into world-size contiguous shards in global-rank
order (xfuser's and raylight's `chunk(..., dim=seq)[rank]`) and yunchang's groups come from
`set_seq_parallel_pg(..., use_ulysses_low=True)` (its default), so that a ring rank's Ulysses group gathers the
contiguous chunk `ring rank`. The text tokens are part of that sequence (text after or before the video).
Not supported: xfuser's `joint_tensor_*` (text kept replicated beside the shards: SD3 / Flux style) -- refused with
an error; calls are not thread-safe (the call's skip list is held on the object while yunchang runs).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.distributed as dist

from ..kernels.attention.naive import sparse_attention_reference
from ..kernels.support import triton_unsupported
from ..masks.skiplists import SkipLists
from .heads import HeadAssignment, SlotLayout, assign_heads, contiguous_heads, head_costs, slice_layer
from .ring import RingPlan, ring_sparse_attention


def group_size(group) -> int:
    """Ranks in a process group; 1 for None (no parallelism along that axis)."""
    return dist.get_world_size(group) if group is not None else 1


def group_rank(group) -> int:
    """This process's rank in a process group; 0 for None."""
    return dist.get_rank(group) if group is not None else 0


class SequenceParallelSparse:
    """One rank's sparse attention for one sigma bucket of a bundle, under Ulysses degree U and ring degree R.

    skip_lists: the bucket's SkipLists (MaskBundle.skip_lists(bucket)); densities: [L, H] calibrated key-block
    densities (MaskBundle.entry_densities()[bucket], host-side; default: the skip lists' own); dense_cutoff: heads
    denser than it run dense, as in SparseRunner (their tables list every key block: exact dense attention in the
    same launch) and cost 1.0 in the head balance; balance: False keeps the engine's contiguous head split.
    Where the runner would use the Triton kernel (CUDA, fp16 / bf16, head_dim 16-128) a Ulysses-only rank (R = 1)
    does too; elsewhere, and for every ring step, the PyTorch reference computes (parallel/ring.py says what the
    kernel needs per ring step)."""

    def __init__(self, skip_lists: SkipLists, *, ulysses_group=None, ring_group=None, densities=None,
                 dense_cutoff: float = 1.0, balance: bool = True):
        self.skip_lists = skip_lists
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.U, self.R = group_size(ulysses_group), group_size(ring_group)
        self.u_rank, self.r_rank = group_rank(ulysses_group), group_rank(ring_group)
        if dist.is_initialized() and (self.U > 1 or self.R > 1):
            g = dist.get_rank() % (self.U * self.R)
            if g != self.r_rank * self.U + self.u_rank:
                raise ValueError(
                    f"rank {dist.get_rank()} is Ulysses rank {self.u_rank} of {self.U} and ring rank {self.r_rank} of "
                    f"{self.R}: its Ulysses group would not gather one contiguous chunk of the sequence. Make the "
                    "groups with yunchang's set_seq_parallel_pg(..., use_ulysses_low=True) (the default)")
        dens = torch.as_tensor(skip_lists.head_densities() if densities is None else densities, dtype=torch.float64)
        H = skip_lists.num_heads
        if tuple(dens.shape) != (skip_lists.num_layers, H):
            raise ValueError(f"densities must be [layers, heads] = [{skip_lists.num_layers}, {H}], got "
                             f"{tuple(dens.shape)}: pass MaskBundle.entry_densities()[bucket]")
        self.dense_heads = dens > dense_cutoff  # [L, H] host
        c = head_costs(dens, dense_cutoff)
        self.assignments = [assign_heads(c[l], self.U) if balance else contiguous_heads(H, self.U)
                            for l in range(skip_lists.num_layers)]
        self.layouts = [SlotLayout(a) for a in self.assignments]
        self._local = {}
        self._on_device = {}
        self._call = None

    @classmethod
    def for_bucket(cls, bundle, bucket: int, **kw) -> "SequenceParallelSparse":
        """The object for one sigma bucket of a MaskBundle: its skip lists (CPU) and its host-side densities. Make
        one per bucket the sampler visits (MaskBundle.bucket_for_sigma) and `install` it when the bucket changes."""
        return cls(bundle.skip_lists(bucket), densities=bundle.entry_densities()[bucket], **kw)

    # -- heads ---------------------------------------------------------------------------------------------------
    def assignment(self, layer: int) -> HeadAssignment:
        return self.assignments[layer]

    def to_slots(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """(B, S, H, D) -> (B, S, U * slots, D) in the layer's assignment's slot order, zeros in padding slots."""
        return self.layouts[layer].to_slots(x)

    def from_slots(self, y: torch.Tensor, layer: int) -> torch.Tensor:
        return self.layouts[layer].from_slots(y)

    def local_layer(self, layer: int, seq_len: int, video_start: int):
        """(this rank's skip list, its real head count, its RingPlan or None): built once per layer and shape."""
        key = (layer, seq_len, video_start)
        if key not in self._local:
            heads = self.assignments[layer].ranks[self.u_rank]
            skip = slice_layer(self.skip_lists.layer(layer), heads).to("cpu")
            full = self.dense_heads[layer][list(heads)]
            if bool(full.any()):
                skip = skip.with_full_heads(full)
            plan = RingPlan.build(skip, seq_len, self.R, video_start) if self.R > 1 else None
            self._local[key] = (skip, len(heads), plan)
        return self._local[key]

    def _skip_on(self, layer: int, skip, device):
        # one copy per layer and device, made on first use: no host-to-device copy per call
        key = (layer, id(skip), str(device))
        if key not in self._on_device:
            self._on_device[key] = skip.to(device)
        return self._on_device[key]

    # -- the call ------------------------------------------------------------------------------------------------
    def attention(self, module, q, k, v, *, layer: int, video_start: int = 0, text_bias=None,
                  scale: Optional[float] = None) -> torch.Tensor:
        """Our sparse attention through yunchang's module (LongContextAttention / UlyssesAttention with `install`
        done): q, k, v (B, S_local, H, D), this rank's contiguous shard; returns (B, S_local, H, D)."""
        if module is not None and getattr(module, "_calibatt_sp", None) is not self:
            raise ValueError("call SequenceParallelSparse.install(module) on this yunchang module first")
        seq_len = q.shape[1] * self.U * self.R
        self._call = (layer, seq_len, video_start, text_bias)
        try:
            out = call_module(module, self.to_slots(q, layer), self.to_slots(k, layer), self.to_slots(v, layer),
                              scale)
        finally:
            self._call = None
        return self.from_slots(out, layer)

    def ring_attn_fn(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *args, group=None, **kwargs):
        """yunchang's ring_attn_fn / attn_fn signature. q, k, v: (B, S / R, slots, D) after the all-to-all."""
        if self._call is None:
            raise RuntimeError("this yunchang module runs calibrated sparse attention: call it through "
                               "SequenceParallelSparse.attention (which knows the layer and the token layout)")
        if causal or dropout_p:
            raise ValueError("calibrated sparse attention is non-causal self-attention without dropout (video DiTs)")
        if any(kwargs.get(n) is not None for n in ("joint_tensor_key", "joint_tensor_value")):
            raise ValueError("xfuser's joint_tensor_* (text kept beside the sequence shards) is not supported: put "
                             "the text tokens in the sequence (text after or before the video)")
        if group is not None and group_size(group) != self.R:
            raise ValueError(f"the module's ring group has {group_size(group)} ranks; this object was made for "
                             f"{self.R}")
        layer, seq_len, video_start, text_bias = self._call
        skip, n, plan = self.local_layer(layer, seq_len, video_start)
        qh, kh, vh = (t[:, :, :n].transpose(1, 2) for t in (q, k, v))  # real heads first, then padding
        skip = self._skip_on(layer, skip, q.device)
        if self.R == 1 and triton_unsupported(qh) is None:
            from ..kernels.attention.triton_fwd import sparse_attention_triton

            o = sparse_attention_triton(qh, kh, vh, skip, scale=softmax_scale, text_bias=text_bias,
                                        video_start=video_start)
        elif self.R == 1:
            o = sparse_attention_reference(qh, kh, vh, skip, scale=softmax_scale, text_bias=text_bias,
                                           video_start=video_start)
        else:
            o = ring_sparse_attention(qh, kh, vh, skip, seq_len=seq_len, group=self.ring_group,
                                      video_start=video_start, scale=softmax_scale, text_bias=text_bias, plan=plan)
        out = q.new_zeros(q.shape)
        out[:, :, :n] = o.transpose(1, 2)
        return out

    def install(self, module):
        """Make a yunchang LongContextAttention (ring_attn_fn) or UlyssesAttention (attn_fn) instance run this
        object's sparse attention. Returns the module."""
        return install_attention(self, module, self.U, self.R)


def call_module(module, q, k, v, scale):
    """Run a yunchang / xfuser attention module on q, k, v: xfuser's xFuserLongContextAttention.forward takes the
    host's attention layer first (attn, query, key, value, ...; None when no KV cache is used)."""
    params = list(inspect.signature(type(module).forward).parameters)
    if len(params) > 1 and params[1] == "attn":
        return module(None, q, k, v, softmax_scale=scale)
    return module(q, k, v, softmax_scale=scale)


def install_attention(owner, module, U: int, R: int):
    """Set owner.ring_attn_fn as the attention function of one yunchang module instance (the seam above)."""
    if hasattr(module, "ring_attn_fn"):
        if R != group_size(getattr(module, "ring_pg", None)) or U != group_size(getattr(module, "ulysses_pg", None)):
            raise ValueError("the module's Ulysses / ring groups are not the ones this object was made with")
        module.ring_attn_fn = owner.ring_attn_fn
    elif hasattr(module, "attn_fn"):
        if R != 1 or U != group_size(getattr(module, "spg", None)):
            raise ValueError("UlyssesAttention has no ring: make this object with its sequence group as "
                             "ulysses_group and no ring_group")
        module.attn_fn = owner.ring_attn_fn
    else:
        raise TypeError(f"{type(module).__name__} is not a yunchang LongContextAttention or UlyssesAttention")
    module._calibatt_sp = owner
    return module
