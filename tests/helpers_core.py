"""Small builders shared by the core tests: random skip lists and bundles with real structure, token-level masks,
and ComfyUI's attention-function contract (the `func` an override receives)."""

import math

import torch
import torch.nn.functional as F

from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, RepetitionPlan, SkipLists, TokenGrid

NEG = -torch.finfo(torch.bfloat16).max  # what ComfyUI's HunyuanVideo puts on padded text keys (bf16 model)


def rel(a, b):
    """Relative error of a against b, in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def _video_text(N, n_video, text_first):
    """(video slice, text slice) of a sequence of N tokens, the text after the video or before it."""
    if text_first:
        return slice(N - n_video, N), slice(0, N - n_video)
    return slice(0, n_video), slice(n_video, N)


def block_energy64(q, k, bias, n_video, geometry, text_first=False):
    """[H, nq, nk] float64 block energy (summed over the batch) from the full softmax matrix, with `bias` on the text
    keys (after the video, or before it when text_first): the specification the statistics kernels are checked
    against."""
    g = geometry
    vid, txt = _video_text(q.shape[2], n_video, text_first)
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s[..., txt] += bias.double()[:, None, None, :]
    p = torch.softmax(s, -1)[:, :, vid, vid]
    H = q.shape[1]
    qi, ki = torch.arange(n_video) // g.block_q, torch.arange(n_video) // g.block_k
    want = torch.zeros(H, g.nq, g.nk, dtype=torch.float64)
    want.index_put_((torch.arange(H)[:, None, None], qi[None, :, None], ki[None, None, :]), p.sum(0),
                    accumulate=True)
    return want


def padded_bias(B, T, gen, shared, *, step=2, inf_first_key=False):
    """Random finite text bias with padded keys (NEG): row r pads its last 1 + step * r keys; one row when shared,
    else B. inf_first_key: the last row's first key gets -inf as well (a boolean-mask style value)."""
    rows = 1 if shared else B
    bias = torch.randn(rows, T, generator=gen)
    for r in range(rows):
        bias[r, T - 1 - step * r:] = NEG
    if inf_first_key:
        bias[-1, 0] = float("-inf")
    return bias


def random_block_mask(L, H, geometry, density, gen):
    return torch.rand(L, H, geometry.nq, geometry.nk, generator=gen) < density


def make_bundle(*, L=2, H=3, grid=None, block=16, steps=4, shared_steps=True, repetition=True, seed=0,
                density=0.3, family="wan21", head_dim=16):
    gen = torch.Generator().manual_seed(seed)
    grid = grid or TokenGrid(frames=3, height=6, width=8)
    g = BlockGeometry(grid.video_tokens, block, block)
    sig = ModelSignature(family, L, H, head_dim, head_dim * H)
    buckets, plans = [], []
    base = random_block_mask(L, H, g, density, gen)
    for b in range(steps - 1 if shared_steps else steps):
        m = base.clone()
        m[0, 0] ^= torch.rand(g.nq, g.nk, generator=gen) < 0.1  # late buckets differ a little from each other
        rep = None
        if repetition and b == 0:
            slot = torch.full((L, H), -1, dtype=torch.int32)
            slot[0, H - 1] = 0
            K = 2
            anchors = torch.randperm(grid.frame_tokens, generator=gen)[:K][None]
            row_anchor = torch.randint(0, K, (1, grid.frame_tokens), generator=gen)
            rep = RepetitionPlan(grid.frame_tokens, slot, anchors, row_anchor)
        buckets.append(m)
        plans.append(rep)
    sigmas = torch.linspace(1.0, 0.05, steps).tolist()
    step_bucket = list(range(len(buckets)))
    if shared_steps:
        step_bucket.append(len(buckets) - 1)  # the last two steps share a bucket
    return MaskBundle.from_block_masks(sig, grid, g, buckets, sigmas, step_bucket, repetition=plans,
                                       settings={"preset": "balanced", "rho": 0.5})


def token_mask(layer, n_video, n_text, text_first=False):
    """[H, N, N] bool from a layer's block mask, expanded independently of the reference's own code; the video
    tokens sit after the n_text text tokens when text_first."""
    g = layer.geometry
    blocks = layer.block_mask()
    N = n_video + n_text
    vid, _ = _video_text(N, n_video, text_first)
    m = torch.ones(blocks.shape[0], N, N, dtype=torch.bool)
    qb = torch.arange(n_video) // g.block_q
    kb = torch.arange(n_video) // g.block_k
    m[:, vid, vid] = blocks[:, qb][:, :, kb]
    return m


def masked_sdpa64(q, k, v, bias, n_video, tok_mask=None, text_first=False):
    """float64 SDPA with `bias` ((Bb, T), or None) on the text keys (after the video, or before it when text_first)
    as a full (Bb, 1, 1, N) additive mask, plus the token mask."""
    N = k.shape[2]
    _, txt = _video_text(N, n_video, text_first)
    full = torch.zeros(1 if bias is None else bias.shape[0], N, dtype=torch.float64)
    if bias is not None:
        full[:, txt] = bias.double()
    full = full[:, None, None]
    if tok_mask is not None:
        full = full.masked_fill(~tok_mask[None], float("-inf"))
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=full)


def comfy_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                    **kwargs):
    """ComfyUI's attention_pytorch contract, mask handling included (2-D -> (1, Lq, Lk), 3-D -> (B, 1, Lq, Lk))."""
    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, c = q.shape
        d = c // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * d)
    return out


def text_to_front(x, n_video, dim):
    """The same tokens with the text (everything after the first n_video along dim) moved before the video."""
    return torch.cat([x.narrow(dim, n_video, x.shape[dim] - n_video), x.narrow(dim, 0, n_video)], dim)


def text_to_back(x, n_video, dim):
    """Inverse of text_to_front: a text-first sequence back to video-then-text order."""
    n_text = x.shape[dim] - n_video
    return torch.cat([x.narrow(dim, n_text, n_video), x.narrow(dim, 0, n_text)], dim)


# q / k / v in a host's layout: (B, H, N, D) "bhld" or (B, N, H*D) "bld".
def to_layout(t, layout):
    B, H, N, D = t.shape
    return t if layout == "bhld" else t.transpose(1, 2).reshape(B, N, H * D)


def from_layout(t, layout, H):
    if layout == "bhld":
        return t
    B, N, C = t.shape
    return t.view(B, N, H, C // H).transpose(1, 2)


def sparse_rep_layer(gen, H, frames, Tf, block, density=0.4):
    """A sparse (not all-keep) layer whose last head is repetitive (3 anchors a frame)."""
    g = BlockGeometry(frames * Tf, *block)
    slot = torch.full((1, H), -1, dtype=torch.int32)
    slot[0, H - 1] = 0
    plan = RepetitionPlan(Tf, slot, torch.randperm(Tf, generator=gen)[:3].sort().values[None],
                          torch.randint(0, 3, (1, Tf), generator=gen))
    m = torch.rand(1, H, g.nq, g.nk, generator=gen) < density
    m[..., 0, g.nk - 1] = False  # the first query block skips the last key block (never its diagonal)
    layer = SkipLists.from_block_mask(m, g, plan).layer(0)
    assert not bool(layer.block_mask().all()), "the test needs skipped blocks"
    return layer
