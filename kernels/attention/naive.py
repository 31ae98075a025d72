"""Plain-PyTorch block-sparse attention that follows a LayerSkipList: the specification the kernels must match.

Semantics (the same for the Triton kernel):
- The sequence is `geometry.num_tokens` video tokens and `num_text` text tokens (joint attention), the text after
  the video (video_start = 0) or before it (video_start = num_text: HunyuanVideo on ComfyUI 0.19+); skip lists
  number the video tokens from 0 either way.
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

from ...masks.skiplists import LayerSkipList
from ..layouts import from_bhld, to_bhld, token_spans
from ..text_bias import as_text_bias, full_key_bias


def _attend(q, k, v, scale, key_mask=None, key_bias=None):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + key_bias
    if key_mask is not None:
        s = s.masked_fill(~key_mask, float("-inf"))
        if key_mask.shape[-2] == 1:
            # The same keys for every row: zero the skipped keys' values, since their probability 0 times an inf or
            # NaN value would still be NaN. A skipped key never reaches the output, as in the Triton kernel (which
            # never loads it) and in dense attention over the kept blocks.
            v = v.masked_fill(~key_mask.transpose(-1, -2), 0.0)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def sparse_attention_reference(q, k, v, skip: LayerSkipList, *, layout: str = "bhld", heads: int | None = None,
                               scale: float | None = None, text_bias: torch.Tensor | None = None,
                               video_start: int = 0) -> torch.Tensor:
    """video_start: where the video tokens start, 0 (text after them) or the text token count (text first);
    kernels/layouts.py token_spans."""
    qh, kh, vh = (to_bhld(t, layout, heads) for t in (q, k, v))
    B, H, N, D = qh.shape
    g = skip.geometry
    Nv = g.num_tokens
    if N < Nv or kh.shape[2] != N:
        raise ValueError(f"sequence of {N} tokens (keys {kh.shape[2]}) does not cover the {Nv} masked tokens")
    vs, ts, Nt = token_spans(N, Nv, video_start)
    if skip.num_heads != H:
        raise ValueError(f"skip list has {skip.num_heads} heads, the call has {H}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = torch.float64 if qh.dtype == torch.float64 else torch.float32
    qf, kf, vf = qh.to(cdt), kh.to(cdt), vh.to(cdt)
    out = torch.empty(B, H, N, D, dtype=cdt, device=qh.device)
    tb = as_text_bias(text_bias, B, Nt, dtype=cdt)
    kb = None if tb is None else full_key_bias(tb, Nv, text_first=vs > 0).to(qh.device)  # [Bb, N]
    kb4 = None if kb is None else kb[:, None, None, :]

    blocks = skip.block_mask().to(qh.device)  # [H, nq, nk]
    key_mask = torch.ones(H, N, dtype=torch.bool, device=qh.device)  # text keys stay True
    for qb in range(g.nq):
        r0, r1 = vs + qb * g.block_q, vs + min((qb + 1) * g.block_q, Nv)
        key_mask[:, vs:vs + Nv] = blocks[:, qb].repeat_interleave(g.block_k, dim=-1)[:, :Nv]
        out[:, :, r0:r1] = _attend(qf[:, :, r0:r1], kf, vf, scale, key_mask[None, :, None, :], kb4)
    if Nt:
        out[:, :, ts:ts + Nt] = _attend(qf[:, :, ts:ts + Nt], kf, vf, scale, None, kb4)

    rep = skip.repetition
    if rep is not None:
        T = rep.frame_tokens
        frames = Nv // T
        base = vs + torch.arange(frames, device=qh.device)[:, None] * T
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
            out[:, h, vs:vs + frames * T] = a_out[:, src]
    return from_bhld(out.to(qh.dtype), layout)
