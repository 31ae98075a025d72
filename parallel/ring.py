"""Ring attention over calibrated skip lists: each rank holds one contiguous shard of the sequence (queries and
keys), the key/value shards travel round the ring, and every step computes only what the skip lists keep.

Skip lists stay indexed by GLOBAL key block: a query row of global block qb, at the step that holds key shard j,
attends to the kept blocks of qb that overlap shard j's tokens (shard borders need not fall on block borders), plus
the text keys of shard j; text rows attend to every key. Partial results (output, log-sum-exp) merge exactly
(`merge_partial`). A step whose key shard holds no kept block for any local query block (and no text on either
side) is skipped without computing anything: `RingPlan` decides that once per layer and bucket on the host from the
skip lists, so the hot path has no host sync. The shard still moves on round the ring (the next rank may need it).

Repetitive heads: their anchor rows attend to every key, and a frame's anchor may live on another rank. The
anchors' queries (a few rows per frame) are summed into every rank once per call (one all-reduce), every rank
computes all anchor rows against each shard it holds, and each local row then takes its anchor's output; the
heads' other video rows compute nothing in the ring.

Compute here is plain PyTorch (the reference's semantics, kernels/attention/naive.py, in float32 / float64), a
correctness path: it builds per-step token masks and selects the anchors' rows with boolean indexing (device
syncs on a GPU), which the kernel path below would not. The Triton
kernel (kernels/attention/triton_fwd.py) could run each step instead; it would need (1) the log-sum-exp of every row
returned beside the output (it keeps m and l per row already), (2) a key window [c0, c1) of global key positions
whose outside is masked (partial blocks at shard borders) with the k/v pointers offset to the shard, (3) a query
row offset (the shard's first global row) so it reads the right block row of the global table, and (4) the
step's list of query blocks with work (RingPlan.query_blocks) as its launch grid. None of that changes the tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..kernels.layouts import token_spans
from ..kernels.attention.naive import sparse_attention_reference
from ..kernels.text_bias import as_text_bias, full_key_bias
from ..masks.skiplists import LayerSkipList


def merge_partial(out, lse, out_b, lse_b):
    """Merge two partial attentions of the same rows over disjoint key sets: out [..., R, D], lse [..., R] (-inf
    where a part saw no key). Exact: softmax over the union of the keys."""
    if out is None:
        return out_b, lse_b
    new = torch.logaddexp(lse, lse_b)
    finite = torch.isfinite(new)
    safe = torch.where(finite, new, torch.zeros_like(new))
    wa = torch.where(finite, torch.exp(lse - safe), torch.zeros_like(new))
    wb = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(new))
    return out * wa[..., None] + out_b * wb[..., None], new


def partial_attention(q, k, v, scale: float, key_mask=None, key_bias=None):
    """(out, lse) of softmax attention of q [B, H, R, D] over k, v [B, H, C, D] restricted to key_mask ([H, R, C]
    or None = all keys) with an additive key_bias ([Bb, C] or None). Rows without a key: out 0, lse -inf."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + key_bias[:, None, None, :]
    if key_mask is not None:
        s = s.masked_fill(~key_mask[None], float("-inf"))
    m = s.amax(-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m[..., None])
    l = p.sum(-1)
    out = torch.matmul(p, v) / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    lse = torch.where(l > 0, m + torch.log(l), torch.full_like(l, float("-inf")))
    return out, lse


def _repetitive_heads(skip: LayerSkipList) -> list:
    rep = skip.repetition
    if rep is None:
        return []
    return [h for h, s in enumerate(rep.on_host().head_slot.tolist()) if s >= 0]


def shard_key_mask(skip: LayerSkipList, rows: range, keys: range, seq_len: int, video_start: int = 0,
                   blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[H, len(rows), len(keys)] bool: which keys (global positions `keys`) each row (global positions `rows`)
    attends to in the ring's per-step computation. Repetitive heads' video rows of whole frames are False (their
    anchors provide them)."""
    g = skip.geometry
    vs, _, _ = token_spans(seq_len, g.num_tokens, video_start)
    bm = skip.block_mask() if blocks is None else blocks  # [H, nq, nk]
    dev = bm.device
    r = torch.arange(rows.start, rows.stop, device=dev)
    c = torch.arange(keys.start, keys.stop, device=dev)
    vrow = (r >= vs) & (r < vs + g.num_tokens)
    vkey = (c >= vs) & (c < vs + g.num_tokens)
    rb = ((r - vs) // g.block_q).clamp(0, g.nq - 1)
    kb = ((c - vs) // g.block_k).clamp(0, g.nk - 1)
    m = bm[:, rb][:, :, kb]
    m = m | ~vkey[None, None, :]
    m = m | ~vrow[None, :, None]
    rep = skip.repetition
    if rep is not None:
        host = rep.on_host()
        covered = (r >= vs) & (r < vs + (g.num_tokens // host.frame_tokens) * host.frame_tokens)
        for h in _repetitive_heads(skip):
            m[h] &= ~covered[:, None]
    return m


@dataclass(frozen=True)
class RingPlan:
    """Which (query shard, key shard) pairs of one layer have any work: computed[i, j]. Built once on the host from
    the skip lists; query_blocks[i][j] = the (head, global query block) pairs of shard i with a kept block in j."""

    world_size: int
    shard_tokens: int
    computed: torch.Tensor  # [P, P] bool
    pairs: torch.Tensor  # [P, P] int64: (head, query block) pairs with work

    @classmethod
    def build(cls, skip: LayerSkipList, seq_len: int, world_size: int, video_start: int = 0) -> "RingPlan":
        S = shard_length(seq_len, world_size)
        g = skip.geometry
        vs, _, _ = token_spans(seq_len, g.num_tokens, video_start)
        bm = skip.to("cpu").block_mask()
        computed = torch.zeros(world_size, world_size, dtype=torch.bool)
        pairs = torch.zeros(world_size, world_size, dtype=torch.int64)

        def blocks_of(a, b, size, n):  # video blocks overlapping global tokens [a, b)
            lo, hi = max(a, vs) - vs, min(b, vs + g.num_tokens) - vs
            return list(range(lo // size, (hi - 1) // size + 1)) if hi > lo else []

        def has_text(a, b):
            return (b - a) > len(range(max(a, vs), min(b, vs + g.num_tokens)))

        for i in range(world_size):
            qb = blocks_of(i * S, (i + 1) * S, g.block_q, g.nq)
            for j in range(world_size):
                kb = blocks_of(j * S, (j + 1) * S, g.block_k, g.nk)
                hit = bm[:, qb][:, :, kb].any(-1) if qb and kb else torch.zeros(0, dtype=torch.bool)
                pairs[i, j] = int(hit.sum())
                computed[i, j] = bool(hit.any()) or has_text(i * S, (i + 1) * S) or has_text(j * S, (j + 1) * S)
        return cls(world_size, S, computed, pairs)


def shard_length(seq_len: int, world_size: int) -> int:
    if seq_len % world_size:
        raise ValueError(f"a sequence of {seq_len} tokens does not split into {world_size} equal shards: the engine "
                         "(xDiT / yunchang) needs the sequence length divisible by the sequence-parallel degree; "
                         "pad the sequence or pick a degree that divides it")
    return seq_len // world_size


def _ring_exchange(t: torch.Tensor, group) -> torch.Tensor:
    """Send t to the next rank of the ring, receive the previous rank's."""
    rank, P = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % P) if group is not None else (rank + 1) % P
    prv = dist.get_global_rank(group, (rank - 1) % P) if group is not None else (rank - 1) % P
    recv = torch.empty_like(t)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)])
    for r in reqs:
        r.wait()
    return recv


def ring_sparse_attention(q, k, v, skip: LayerSkipList, *, seq_len: int, group=None, video_start: int = 0,
                          scale: Optional[float] = None, text_bias: Optional[torch.Tensor] = None,
                          plan: Optional[RingPlan] = None) -> torch.Tensor:
    """Block-sparse attention of this rank's shard. q, k, v: [B, H, S, D], the rank's contiguous shard of a
    sequence of seq_len tokens (shard index = rank in `group`); skip: the layer's skip list for these H heads
    (global key blocks; parallel/heads.py slice_layer under USP). Returns the shard's output [B, H, S, D] in q's
    dtype, equal to sparse_attention_reference on the whole sequence within rounding. plan: RingPlan.build of this
    layer (built here when None; build it once per bucket to keep the host work out of the step)."""
    P = dist.get_world_size(group) if dist.is_initialized() else 1
    B, H, S, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if P == 1:
        return sparse_attention_reference(q, k, v, skip, scale=scale, text_bias=text_bias, video_start=video_start)
    if S != shard_length(seq_len, P):
        raise ValueError(f"shard of {S} tokens, but {seq_len} tokens over {P} ranks make shards of {seq_len // P}")
    if skip.num_heads != H:
        raise ValueError(f"skip list has {skip.num_heads} heads, the shard has {H}")
    rank = dist.get_rank(group)
    plan = plan if plan is not None else RingPlan.build(skip, seq_len, P, video_start)
    g = skip.geometry
    vs, _, Nt = token_spans(seq_len, g.num_tokens, video_start)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(cdt)
    kv = torch.stack([k.to(cdt), v.to(cdt)])
    tb = as_text_bias(text_bias, B, Nt, dtype=cdt)
    kbias = None if tb is None else full_key_bias(tb, g.num_tokens, text_first=vs > 0).to(q.device)  # [Bb, N]
    blocks = skip.block_mask().to(q.device)
    rows = range(rank * S, (rank + 1) * S)

    # Repetitive heads: every anchor row's query, on every rank (one all-reduce of a few rows per frame).
    rep_heads = _repetitive_heads(skip)
    if rep_heads:
        rep = skip.repetition.to(q.device)
        slots = [int(rep.on_host().head_slot[h]) for h in rep_heads]  # host copy: no device read
        frames = g.num_tokens // rep.frame_tokens
        anchor_rows = torch.stack([(vs + torch.arange(frames, device=q.device)[:, None] * rep.frame_tokens
                                    + rep.anchors[s][None, :]).reshape(-1) for s in slots])
        qa = torch.zeros(B, len(rep_heads), anchor_rows.shape[1], D, dtype=cdt, device=q.device)
        mine = (anchor_rows >= rows.start) & (anchor_rows < rows.stop)
        for i, h in enumerate(rep_heads):
            qa[:, i, mine[i]] = qf[:, h, anchor_rows[i, mine[i]] - rows.start]
        dist.all_reduce(qa, group=group)
        a_out = a_lse = None
        rep_idx = torch.as_tensor(rep_heads, device=q.device)

    out = lse = None
    for step in range(P):
        src = (rank - step) % P
        keys = range(src * S, (src + 1) * S)
        nxt = _ring_exchange(kv, group) if step + 1 < P else None
        kb = None if kbias is None else kbias[:, keys.start:keys.stop]
        if plan.computed[rank, src]:
            mask = shard_key_mask(skip, rows, keys, seq_len, video_start, blocks)
            o, l = partial_attention(qf, kv[0], kv[1], scale, mask, kb)
            out, lse = merge_partial(out, lse, o, l)
        if rep_heads:
            o, l = partial_attention(qa, kv[0][:, rep_idx], kv[1][:, rep_idx], scale, None, kb)
            a_out, a_lse = merge_partial(a_out, a_lse, o, l)
        if nxt is not None:
            kv = nxt
    if out is None:  # no step had work: impossible while the diagonal is kept, but keep the shape honest
        out = torch.zeros_like(qf)
    if rep_heads:
        T = rep.frame_tokens
        K = rep.anchors.shape[1]
        r = torch.arange(rows.start, rows.stop, device=q.device)
        covered = (r >= vs) & (r < vs + frames * T)
        pos = r[covered] - vs
        for i, h in enumerate(rep_heads):
            src_row = (pos // T) * K + rep.row_anchor[slots[i]][pos % T]
            out[:, h, covered] = a_out[:, i, src_row]
    return out.to(q.dtype)
