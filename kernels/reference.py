"""Plain-PyTorch block-sparse attention that follows a LayerSkipList: the specification the kernels must match.

Semantics (the same for the Triton kernel):
- The sequence is `geometry.num_tokens` video tokens, then `num_text` text tokens (joint attention).
- A video query in block qb attends to the video key blocks listed for (head, qb) and to every text key.
- A text query attends to every key.
- For a repetitive head, anchor rows (per frame, `anchors` positions) attend to every key; every other video row
  of that frame takes the output of its anchor (`row_anchor`). Text rows stay dense.
- An optional text bias (kernels/text_bias.py, (T,), (1, T) or (B, T)) is added to the scores of the text keys in
  every row that sees them (all rows: video, text and anchor rows), e.g. -inf / -max on padded text keys.
Computation runs in float32 (float64 for float64 inputs) and is cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch

from ..masks.skiplists import LayerSkipList
from .layouts import from_bhld, to_bhld
from .text_bias import as_text_bias, full_key_bias


def _attend(q, k, v, scale, key_mask=None, key_bias=None):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + key_bias
    if key_mask is not None:
        s = s.masked_fill(~key_mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def sparse_attention_reference(q, k, v, skip: LayerSkipList, *, layout: str = "bhld", heads: int | None = None,
                               scale: float | None = None, text_bias: torch.Tensor | None = None) -> torch.Tensor:
    qh, kh, vh = (to_bhld(t, layout, heads) for t in (q, k, v))
    B, H, N, D = qh.shape
    g = skip.geometry
    Nv = g.num_tokens
    if N < Nv or kh.shape[2] != N:
        raise ValueError(f"sequence of {N} tokens (keys {kh.shape[2]}) does not cover the {Nv} masked tokens")
    if skip.num_heads != H:
        raise ValueError(f"skip list has {skip.num_heads} heads, the call has {H}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = torch.float64 if qh.dtype == torch.float64 else torch.float32
    qf, kf, vf = qh.to(cdt), kh.to(cdt), vh.to(cdt)
    out = torch.empty(B, H, N, D, dtype=cdt, device=qh.device)
    tb = as_text_bias(text_bias, B, N - Nv, dtype=cdt)
    kb = None if tb is None else full_key_bias(tb, Nv).to(qh.device)  # [Bb, N]
    kb4 = None if kb is None else kb[:, None, None, :]

    blocks = skip.block_mask().to(qh.device)  # [H, nq, nk]
    text_keys = torch.ones(H, N - Nv, dtype=torch.bool, device=qh.device)
    for qb in range(g.nq):
        r0, r1 = qb * g.block_q, min((qb + 1) * g.block_q, Nv)
        video_keys = blocks[:, qb].repeat_interleave(g.block_k, dim=-1)[:, :Nv]  # [H, Nv]
        key_mask = torch.cat([video_keys, text_keys], dim=-1)[None, :, None, :]
        out[:, :, r0:r1] = _attend(qf[:, :, r0:r1], kf, vf, scale, key_mask, kb4)
    if N > Nv:
        out[:, :, Nv:] = _attend(qf[:, :, Nv:], kf, vf, scale, None, kb4)

    rep = skip.repetition
    if rep is not None:
        T = rep.frame_tokens
        frames = Nv // T
        base = torch.arange(frames, device=qh.device)[:, None] * T
        for h in range(H):
            slot = int(rep.head_slot[h])
            if slot < 0:
                continue
            anchor_rows = (base + rep.anchors[slot].to(qh.device)[None, :]).reshape(-1)  # [F*K]
            a_out = _attend(qf[:, h, anchor_rows], kf[:, h], vf[:, h], scale, None,
                            None if kb is None else kb[:, None, :])  # [B, F*K, D]
            K = rep.anchors.shape[1]
            src = (torch.arange(frames, device=qh.device)[:, None] * K
                   + rep.row_anchor[slot].to(qh.device)[None, :]).reshape(-1)  # [F*T]
            out[:, h, :frames * T] = a_out[:, src]
    return from_bhld(out.to(qh.dtype), layout)


def dense_attention_reference(q, k, v, block_mask_tokens=None, *, scale=None) -> torch.Tensor:
    """(B, H, L, D) dense attention with an optional [H, Lq, Lk] boolean token mask, in float64 (tests)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    return _attend(q.double(), k.double(), v.double(), scale,
                   None if block_mask_tokens is None else block_mask_tokens[None])
