"""diffusers adapter on the shipped tiny Wan model (reduced to 4 frames = 2 x 16 x 16 tokens): the dense path is
bit-identical to the unpatched model, processors come back exactly, bundles are validated, and calibrate + patch
runs end to end."""

import textwrap

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers adapter is optional; install diffusers==0.42.1 (make setup) "
                                        "to run these tests")

from calibatt.adapters import diffusers_wan as A  # noqa: E402
from calibatt.calibration import CalibrationSettings  # noqa: E402
from calibatt.kernels.runner import SparseRunner  # noqa: E402
from calibatt.masks import BlockGeometry, BundleError, MaskBundle, ModelSignature  # noqa: E402
from calibatt.tinywan import data, evaluate, pipeline  # noqa: E402
from calibatt.tinywan.model import load_tinywan  # noqa: E402

FRAMES = 4  # 2 latent frames: 512 tokens, 8 blocks of 64
KW = evaluate.HOOK_KW


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_tinywan()


def _inputs(model, seed=0, t=640.0):
    x = pipeline.initial_noise([seed, seed + 1], model.cfg, frames=FRAMES)
    ctx = model.text(data.held_out_captions(2))
    return x, torch.tensor([t, t]), ctx


def _forward(model, x, t, ctx):
    with torch.no_grad():
        return model.transformer(x, t, ctx, return_dict=False)[0]


def _full_bundle(model, grid, density_mask=None, signature=None):
    g = BlockGeometry(grid.video_tokens, 64, 64)
    L, H = model.cfg.layers, model.cfg.dim_heads
    mask = torch.ones(L, H, g.nq, g.nk, dtype=torch.bool) if density_mask is None else density_mask
    return MaskBundle.from_block_masks(signature or model.signature(), grid, g, [mask], [1.0], [0])


def test_dense_path_is_bit_identical_and_restores_processors(model):
    x, t, ctx = _inputs(model)
    ref = _forward(model, x, t, ctx)
    before1 = [b.attn1.processor for b in model.transformer.blocks]
    before2 = [b.attn2.processor for b in model.transformer.blocks]
    timer = A.AttentionTimer()
    with A.patch_dense(model.transformer, timer=timer, **KW) as hook:
        assert all(type(b.attn1.processor).__name__ == "_SelfAttentionProcessor" for b in model.transformer.blocks)
        assert [b.attn2.processor for b in model.transformer.blocks] == before2  # cross-attention untouched
        out = _forward(model, x, t, ctx)
    assert torch.equal(out, ref)
    assert timer.calls == model.cfg.layers and timer.seconds > 0
    assert hook.sigma == pytest.approx(0.64)  # read from `timestep` once per forward when no begin_step came
    assert [b.attn1.processor for b in model.transformer.blocks] == before1
    # and after an exception inside the block
    with pytest.raises(RuntimeError, match="boom"):
        with A.patch_dense(model.transformer, **KW):
            raise RuntimeError("boom")
    assert [b.attn1.processor for b in model.transformer.blocks] == before1
    assert not model.transformer._forward_pre_hooks


def test_sparse_with_every_block_matches_dense(model):
    x, t, ctx = _inputs(model, seed=3)
    ref = _forward(model, x, t, ctx)
    grid = model.cfg.grid(frames=FRAMES)
    bundle = _full_bundle(model, grid)
    # dense_cutoff 1.0 keeps fully dense heads on the sparse path, so the block-sparse code computes them.
    with A.patch_sparse(model.transformer, bundle, runner=SparseRunner(bundle, dense_cutoff=1.0), **KW):
        out = _forward(model, x, t, ctx)
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < 1e-4  # the reference path, not the original SDPA call, computed it


def test_sparse_actually_skips_blocks(model):
    x, t, ctx = _inputs(model, seed=4)
    ref = _forward(model, x, t, ctx)
    grid = model.cfg.grid(frames=FRAMES)
    g = BlockGeometry(grid.video_tokens, 64, 64)
    diag_only = torch.zeros(model.cfg.layers, model.cfg.dim_heads, g.nq, g.nk, dtype=torch.bool)
    bundle = _full_bundle(model, grid, diag_only)
    with A.patch_sparse(model.transformer, bundle, runner=SparseRunner(bundle, dense_cutoff=1.0), **KW):
        out = _forward(model, x, t, ctx)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-2  # a diagonal-only mask changes the output


def test_dense_window_through_the_timestep_hook_needs_and_uses_the_schedule(model):
    """A pipeline that never calls begin_step: with dense_first the hook must know where each step sits in the
    run. Without a schedule it refuses at the first forward (a dense window silently ignored would be a wrong
    result); with scheduler-style sigmas it finds the step from the timestep's sigma by the hosts' rule, so the
    first half of a 4-step run is dense (bit-identical to the unpatched model) and the second half sparse."""
    grid = model.cfg.grid(frames=FRAMES)
    g = BlockGeometry(grid.video_tokens, 64, 64)
    diag_only = torch.zeros(model.cfg.layers, model.cfg.dim_heads, g.nq, g.nk, dtype=torch.bool)
    bundle = _full_bundle(model, grid, diag_only)
    schedule = [1.0, 0.8, 0.6, 0.4, 0.0]  # 4 steps and the end point, as scheduler.sigmas
    x, _, ctx = _inputs(model, seed=5)
    with pytest.raises(ValueError, match="schedule=scheduler.sigmas"):
        with A.patch_sparse(model.transformer, bundle, dense_first=0.5, **KW):
            _forward(model, x, torch.tensor([800.0, 800.0]), ctx)
    outs = {}
    for t in (800.0, 400.0):  # steps 1 (fraction 0.25: dense) and 3 (0.75: sparse)
        tt = torch.tensor([t, t])
        ref = _forward(model, x, tt, ctx)
        with A.patch_sparse(model.transformer, bundle, dense_first=0.5, schedule=schedule,
                            runner=SparseRunner(bundle, dense_first=0.5, dense_cutoff=1.0), **KW):
            outs[t] = (_forward(model, x, tt, ctx), ref)
    assert torch.equal(*outs[800.0])
    assert (outs[400.0][0] - outs[400.0][1]).abs().max() > 1e-2


def test_bundle_mismatches_are_refused(model):
    grid = model.cfg.grid(frames=FRAMES)
    bundle = _full_bundle(model, grid)
    x, t, ctx = _inputs(model)
    longer = pipeline.initial_noise([0, 1], model.cfg, frames=2 * FRAMES)
    with pytest.raises(BundleError, match="latent frames"):
        with A.patch_sparse(model.transformer, bundle, **KW):
            _forward(model, longer, t, ctx)
    assert type(model.transformer.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"
    # A bundle for a Wan of another architecture (16 latent channels, 1x2x2 patches: a real Wan T2V's input) is
    # refused when patching, before anything runs, naming each differing field.
    sig = model.signature()
    other = ModelSignature(sig.family, sig.num_layers, sig.num_heads, sig.head_dim, sig.dim,
                           dict(sig.extra, in_channels=16, patch="1x2x2"))
    with pytest.raises(BundleError, match="in_channels=16; this model has in_channels=3") as e:
        A.patch_sparse(model.transformer, _full_bundle(model, grid, signature=other))
    assert "patch=1x2x2; this model has patch=2x2x2" in str(e.value)
    assert type(model.transformer.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"


def _assert_calibrated_density(bundle):
    """A balanced-schedule calibration of the tiny model: its eps falls from 0.99 to 0.84, so every step keeps more
    than the diagonal every row is given, the later steps drop blocks, and the first step (highest eps) is the
    densest."""
    floor = float(bundle.geometry.diagonal().float().mean())  # 1/8 at 8 x 8 blocks
    dens = bundle.step_densities()
    assert floor < min(dens) and bundle.density < 1, (floor, dens)
    assert dens[0] > max(dens[1:]), dens


def test_calibrate_then_sparse_end_to_end(model):
    settings = CalibrationSettings(preset="balanced", block_q=64, block_k=64, steps=3)
    caps = data.training_captions(2)
    done = []
    bundle = evaluate.calibrate(model, caps, settings, steps=3, frames=FRAMES, progress=done.append)
    assert len(done) == 2 * 3
    bundle.check_compatible(model.signature(), model.cfg.grid(frames=FRAMES))
    assert len(bundle.calibrated_sigmas) == 3
    _assert_calibrated_density(bundle)
    held = data.held_out_captions(1)
    dense, td, calls = evaluate.generate(model, held, [5], steps=3, frames=FRAMES)
    sparse, ts, calls_s = evaluate.generate(model, held, [5], steps=3, frames=FRAMES, mode="sparse", bundle=bundle)
    assert calls == calls_s == 3 * model.cfg.layers
    assert torch.isfinite(sparse).all()
    p = evaluate.psnr(dense[0], sparse[0])
    assert 10 < p < 200
    # 3 steps land on the 3 calibrated sigmas: with no head sent dense the mean is the bundle's own density; the
    # runner's dense cutoff only ever adds blocks, and the sampled run still skips some
    assert evaluate.sampled_density(bundle, 3, dense_cutoff=1.0) == pytest.approx(bundle.density)
    assert bundle.density <= evaluate.sampled_density(bundle, 3) < 1


def _docstring_example() -> str:
    """The indented code block of the adapter module's docstring that starts with `import torch`."""
    doc = A.__doc__
    lines = []
    for line in doc[doc.index("    import torch\n"):].splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


def test_docstring_example_runs_as_written():
    code = _docstring_example()
    assert "patch_calibrate" in code and "patch_sparse" in code and "load_tinywan()" in code
    ns: dict = {}
    exec(compile(code, "adapters/diffusers_wan.py docstring", "exec"), ns)  # noqa: S102 (our own docstring)
    transformer, bundle, sparse, latent = ns["transformer"], ns["bundle"], ns["sparse"], ns["latent"]
    # It calibrated the tiny model at its 2 x 16 x 16-token grid, for each of the three sigmas, and sampled sparse.
    assert bundle.signature == A.wan_signature(transformer)
    assert (bundle.grid.frames, bundle.grid.height, bundle.grid.width) == (2, 16, 16)
    assert bundle.calibrated_sigmas == pytest.approx([1.0, 0.75, 0.5])
    _assert_calibrated_density(bundle)
    assert sparse.shape == latent.shape and torch.isfinite(sparse).all()
    # The context managers put the original processors back.
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in transformer.blocks)
    assert not transformer._forward_pre_hooks


def test_precision_reaches_the_runner_and_is_checked(model):
    grid = model.cfg.grid(frames=FRAMES)
    bundle = _full_bundle(model, grid)
    hook = A.patch_sparse(model.transformer, bundle, precision="int8-qk", **KW)
    assert hook.handler.precision == "int8-qk"
    with pytest.raises(ValueError, match="precision must be one of"):
        A.patch_sparse(model.transformer, bundle, precision="fp4", **KW)
