"""NaN / Inf in q, k or v: every path gives what dense attention over the same kept blocks gives. A key outside a
row's kept blocks never reaches that row (the Triton kernel never loads it); +inf in one value vector used to turn
every row of the CPU reference that skips its block into NaN (0 x inf in the softmax-times-values product).

The specification here is independent of the engine: per row, gather the kept keys (the row's video key blocks and
every text key), softmax over those only, in float64.
"""

# TRITON_INTERPRET is set by tests/conftest.py on machines without CUDA (before any @triton.jit decoration); it
# must not be set here: on a GPU machine it would turn every later test's kernels into interpreted ones.
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from calibatt.kernels.call import AttentionCall  # noqa: E402
from calibatt.kernels.attention.naive import sparse_attention_reference  # noqa: E402
from calibatt.kernels.runner import SparseRunner  # noqa: E402
from calibatt.masks import BlockGeometry, MaskBundle, ModelSignature, SkipLists, TokenGrid  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

GRID_V = TokenGrid(2, 5, 7)  # 70 video tokens: blocks of 16 -> 5 x 5, the last one partial
N_TEXT = 3
H, D, BLOCK = 2, 16, 16


def kept_keys_attention64(q, k, v, blocks, n_video, video_start):
    """(B, H, N, D) float64: every video row attends its kept video key blocks and all text keys, every text row
    attends all keys; keys outside a row's set are never read."""
    B, Hh, N, Dd = q.shape
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty(B, Hh, N, Dd, dtype=torch.float64)
    video = torch.arange(n_video) + video_start
    text = torch.tensor([i for i in range(N) if not video_start <= i < video_start + n_video], dtype=torch.long)
    nq, nk = blocks.shape[-2:]
    for h in range(Hh):
        for i in range(N):
            if video_start <= i < video_start + n_video:
                qb = (i - video_start) // BLOCK
                kept = torch.tensor([j for j in range(n_video) if blocks[h, qb, j // BLOCK]], dtype=torch.long)
                keys = torch.cat([video[kept], text])
            else:
                keys = torch.arange(N)
            s = (q[:, h, i:i + 1] @ k[:, h, keys].transpose(-1, -2)) / math.sqrt(Dd)
            out[:, h, i] = (torch.softmax(s, -1) @ v[:, h, keys])[:, 0]
    return out


def _case(text_position, poison):
    """(grid, geometry, skip lists, (q, k, v) (1, H, N, D) float32, block mask): one non-finite value in key block 4
    (the partial last block), which only query block 4 keeps."""
    grid = TokenGrid(GRID_V.frames, GRID_V.height, GRID_V.width, text_tokens=N_TEXT, text_position=text_position)
    g = BlockGeometry(grid.video_tokens, BLOCK, BLOCK)
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(1, H, g.nq, g.nk, generator=gen) < 0.4
    mask[0, 0] = False  # head 0: diagonal only (added by from_block_mask)
    mask[0, :, :4, 4] = False  # key block 4: kept by query block 4 only, in both heads
    sl = SkipLists.from_block_mask(mask, g)
    vs = grid.video_start
    q, k, v = (torch.randn(1, H, grid.total_tokens, D, generator=gen) for _ in range(3))
    tok = vs + 4 * BLOCK + 2  # a video token of key block 4
    if poison == "v_inf":
        v[0, :, tok, 3] = float("inf")
    elif poison == "v_nan":
        v[0, :, tok, 1] = float("nan")
    elif poison == "k_nan":
        k[0, :, tok, 0] = float("nan")
    else:  # k_inf: that key's score is +-inf or NaN for every row that keeps it
        k[0, :, tok, 0] = float("inf")
    return grid, g, sl, (q, k, v), sl.block_mask()


def _same(out, want, rows_clean):
    """Equal where the specification is finite, non-finite where it is, and finite on the rows that skip the
    poisoned block."""
    out = out.double()
    assert torch.equal(torch.isfinite(out), torch.isfinite(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(out[fin], want[fin], rtol=1e-4, atol=1e-4)
    assert bool(torch.isfinite(out[:, :, rows_clean]).all())


POISONS = ["v_inf", "v_nan", "k_nan", "k_inf"]


@pytest.mark.parametrize("text_position", ["end", "start"])
@pytest.mark.parametrize("poison", POISONS)
def test_reference_path(text_position, poison):
    grid, g, sl, (q, k, v), blocks = _case(text_position, poison)
    vs = grid.video_start
    out = sparse_attention_reference(q, k, v, sl.layer(0), video_start=vs)
    want = kept_keys_attention64(q, k, v, blocks[0], grid.video_tokens, vs)
    _same(out, want, slice(vs, vs + 4 * BLOCK))  # query blocks 0-3 never see key block 4


@pytest.mark.parametrize("route", ["sparse", "mixed", "dense", "dense_step"])
@pytest.mark.parametrize("poison", ["v_inf", "k_nan"])
def test_runner_routes_on_the_cpu(route, poison):
    grid, g, sl, (q, k, v), blocks = _case("start", poison)
    sig = ModelSignature("generic", 1, H, D, H * D)
    bundle = MaskBundle.from_block_masks(sig, grid, g, [sl.block_mask()], [1.0], [0])
    dens = bundle.entry_densities()[0, 0]
    cutoff = {"sparse": 1.0, "mixed": float(dens.min() + dens.max()) / 2, "dense": 0.0, "dense_step": 1.0}[route]
    runner = SparseRunner(bundle, dense_cutoff=cutoff, dense_first=1.0 if route == "dense_step" else 0.0)
    if route == "dense_step":
        runner.begin_step(1.0, "cpu", step_fraction=0.0)
    out = runner(AttentionCall(q, k, v, "bhld", H, 0, 1.0, grid))
    if route == "mixed":
        assert runner.route(0) == "mixed"
    kept = blocks[0].clone()
    if route in ("dense", "dense_step"):
        kept[:] = True  # dense rows keep every block: non-finite wherever dense attention is
    elif route == "mixed":
        kept[dens > cutoff] = True
    want = kept_keys_attention64(q, k, v, kept, grid.video_tokens, grid.video_start)
    vs = grid.video_start
    sparse_heads = [h for h in range(H) if not bool(kept[h].all())]
    _same(out[:, sparse_heads], want[:, sparse_heads], slice(vs, vs + 4 * BLOCK))
    dense_heads = [h for h in range(H) if bool(kept[h].all())]
    if dense_heads:
        assert torch.equal(torch.isfinite(out[:, dense_heads]), torch.isfinite(want[:, dense_heads]))


# The interpreter's numpy warns on inf - inf in the softmax of rows that keep the poisoned key (NaN there, as in
# the specification).
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("text_position", ["end", "start"])
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: Triton runs compiled there "
                    "(test_triton_path_on_the_gpu); switching this process to the interpreter would break the GPU tests")
def test_triton_path_interpreted(text_position, poison):
    pytest.importorskip("triton")
    from triton_interp import interpreted_kernels
    TA, _ = interpreted_kernels()
    grid, g, sl, (q, k, v), blocks = _case(text_position, poison)
    vs = grid.video_start
    out = TA.sparse_attention_triton(q.half(), k.half(), v.half(), sl.layer(0), video_start=vs)
    want = kept_keys_attention64(q.half(), k.half(), v.half(), blocks[0], grid.video_tokens, vs)
    out = out.double()
    assert torch.equal(torch.isfinite(out), torch.isfinite(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(out[fin], want[fin], rtol=3e-3, atol=3e-3)
    assert bool(torch.isfinite(out[:, :, vs:vs + 4 * BLOCK]).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton path needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("route", ["sparse", "mixed"])
@pytest.mark.parametrize("poison", ["v_inf", "k_nan"])
def test_triton_path_on_the_gpu(dtype, route, poison):
    grid, g, sl, (q, k, v), blocks = _case("start", poison)
    sig = ModelSignature("generic", 1, H, D, H * D)
    bundle = MaskBundle.from_block_masks(sig, grid, g, [sl.block_mask()], [1.0], [0])
    dens = bundle.entry_densities()[0, 0]
    cutoff = 1.0 if route == "sparse" else float(dens.min() + dens.max()) / 2
    runner = SparseRunner(bundle, dense_cutoff=cutoff)
    q, k, v = (t.to("cuda", dtype) for t in (q, k, v))
    out = runner(AttentionCall(q, k, v, "bhld", H, 0, 1.0, grid)).cpu()
    kept = blocks[0].clone()
    if route == "mixed":
        kept[dens > cutoff] = True
    want = kept_keys_attention64(q.cpu(), k.cpu(), v.cpu(), kept, grid.video_tokens, grid.video_start)
    # In the output's dtype: a finite float64 value past float16's range (a row that gives the poisoned key a
    # little weight) is inf in any float16 attention, dense included.
    want = want.to(dtype).double()
    out = out.double()
    assert torch.equal(torch.isfinite(out), torch.isfinite(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(out[fin], want[fin], rtol=2e-2, atol=2e-2)
    vs = grid.video_start
    sparse_heads = [h for h in range(H) if not bool(kept[h].all())]
    assert bool(torch.isfinite(out[:, sparse_heads, vs:vs + 4 * BLOCK]).all())
