"""One signature per checkpoint, whichever host reads it (masks/signatures.py): the diffusers adapter and the ComfyUI
nodes build the same ModelSignature for the same Wan checkpoint, so a bundle calibrated on one host patches the
model on the other (both directions, with a real calibration through the adapter on the shipped tiny Wan), and
signatures older versions stored still load and fit.

The ComfyUI side is exercised through nodes/model_info.py on unet_config dicts as ComfyUI's detection makes them
(no ComfyUI needed here; tests/test_nodes_comfyui_cross_host.py does it through a real server)."""

import pytest
import torch

from calibatt.calibration import CalibrationSettings
from calibatt.calibration.stats import CalibrationStats
from calibatt.masks import (BlockGeometry, BundleError, MaskBundle, ModelSignature, TokenGrid, load_bundle,
                            save_bundle, signatures)
from calibatt.nodes import model_info as mi


def _diffusers(**over):
    """A WanTransformer3DModel config.json (the fields the signature reads, at the class defaults otherwise)."""
    cfg = {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 40,
           "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
           "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
           "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
           "pos_embed_seq_len": None}
    cfg.update(over)
    return cfg


def _comfy(**over):
    """ComfyUI's detected unet_config of the same file (model_detection.py; num_heads = dim / 128), with the
    num_layers / num_heads / dim that comfy_glue.describe_model fills in."""
    cfg = {"image_model": "wan2.1", "model_type": "t2v", "dim": 5120, "num_heads": 40, "num_layers": 40,
           "in_dim": 16, "out_dim": 16, "patch_size": (1, 2, 2), "ffn_dim": 13824, "freq_dim": 256}
    cfg.update(over)
    return cfg


# The published Wan checkpoints: the diffusers repo's transformer config and what ComfyUI detects in the
# original-format file of the same model.
WAN_CHECKPOINTS = {
    "wan21_t2v_1.3b": (_diffusers(num_attention_heads=12, num_layers=30, ffn_dim=8960),
                       _comfy(dim=1536, num_heads=12, num_layers=30, ffn_dim=8960)),
    "wan21_t2v_14b": (_diffusers(), _comfy()),
    "wan21_i2v_14b": (_diffusers(in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
                      _comfy(model_type="i2v", in_dim=36)),
    "wan21_flf2v_14b": (_diffusers(in_channels=36, image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=514),
                        _comfy(model_type="i2v", in_dim=36, flf_pos_embed_token_number=514)),
    "wan22_i2v_a14b": (_diffusers(in_channels=36), _comfy(in_dim=36)),  # ComfyUI labels it "t2v": no img_emb
    "wan22_ti2v_5b": (_diffusers(num_attention_heads=24, num_layers=30, ffn_dim=14336, in_channels=48,
                                 out_channels=48),
                      _comfy(dim=3072, num_heads=24, num_layers=30, ffn_dim=14336, in_dim=48, out_dim=48)),
}
# The shipped tiny model (tinywan/): 6 layers of 4 heads x 32 on RGB pixels with 2x2x2 patches. ComfyUI's own
# detection assumes 128-wide heads and 1x2x2 patches, so a ComfyUI file of this architecture carries them in its
# metadata config (which ComfyUI 0.19's detection merges into the unet_config).
TINYWAN_COMFY = _comfy(dim=128, num_heads=4, num_layers=6, in_dim=3, out_dim=3, patch_size=(2, 2, 2),
                       ffn_dim=512, freq_dim=64)


def _adapter():
    pytest.importorskip("diffusers", reason="the diffusers adapter needs diffusers==0.42.1 (make setup)")
    from calibatt.adapters import diffusers_wan
    return diffusers_wan


@pytest.mark.parametrize("name", list(WAN_CHECKPOINTS))
def test_both_hosts_build_one_signature_per_wan_checkpoint(name):
    A = _adapter()
    diffusers_cfg, comfy_cfg = WAN_CHECKPOINTS[name]
    sig = A.wan_signature_from_config(diffusers_cfg)
    assert sig == mi.signature_from_config(comfy_cfg)
    assert sig.fingerprint() == mi.signature_from_config(comfy_cfg).fingerprint()  # what a bundle file records


def test_checkpoints_that_need_their_own_masks_have_their_own_signatures():
    A = _adapter()
    sigs = {name: A.wan_signature_from_config(d) for name, (d, _) in WAN_CHECKPOINTS.items()}
    assert sigs["wan21_t2v_14b"].mismatches(sigs["wan21_i2v_14b"]) == [
        "bundle was calibrated for image_embedding=False; this model has image_embedding=True",
        "bundle was calibrated for in_channels=16; this model has in_channels=36"]
    # Wan 2.1 and 2.2 I2V 14B share the shape and the input channels; the CLIP image projection separates them.
    assert sigs["wan21_i2v_14b"].mismatches(sigs["wan22_i2v_a14b"]) == [
        "bundle was calibrated for image_embedding=True; this model has image_embedding=False"]
    assert sigs["wan22_ti2v_5b"].family == "wan22" and sigs["wan22_ti2v_5b"].extra["in_channels"] == 48
    # FLF2V is Wan 2.1 I2V with a positional embedding on the image tokens of cross-attention: same self-attention.
    assert sigs["wan21_flf2v_14b"] == sigs["wan21_i2v_14b"]
    distinct = [n for n in sigs if n != "wan21_flf2v_14b"]
    assert len({sigs[n].fingerprint() for n in distinct}) == len(distinct)


def test_camera_control_variants_are_their_own_models():
    base = mi.signature_from_config(_comfy(model_type="i2v", in_dim=36))
    camera = mi.signature_from_config(_comfy(model_type="camera", in_dim=36))
    assert base.mismatches(camera) == ["bundle was calibrated for camera_control=False; this model has "
                                       "camera_control=True"]
    camera22 = mi.signature_from_config(_comfy(model_type="camera_2.2", in_dim=36))
    assert camera22.extra["camera_control"] and not camera22.extra["image_embedding"]


def test_a_patch_size_from_the_file_reaches_the_signature_and_the_grid():
    layout = mi.family_layout(TINYWAN_COMFY)
    assert layout.patch == (2, 2, 2) and mi.signature_from_config(TINYWAN_COMFY).extra["patch"] == "2x2x2"
    assert mi.grid_from_latent(layout, (1, 3, 4, 32, 32)).video_tokens == 2 * 16 * 16


def test_builders_refuse_what_is_not_a_model():
    with pytest.raises(ValueError, match="positive layers, heads and head_dim"):
        signatures.wan(num_layers=0, num_heads=2, head_dim=128, in_channels=16, out_channels=16, patch=(1, 2, 2),
                       image_embedding=False)
    with pytest.raises(ValueError, match="3 entries"):
        signatures.wan(num_layers=2, num_heads=2, head_dim=128, in_channels=16, out_channels=16, patch=(2, 2),
                       image_embedding=False)
    A = _adapter()
    with pytest.raises(ValueError, match="in_channels missing"):
        A.wan_signature_from_config({k: v for k, v in _diffusers().items() if k != "in_channels"})


# ---------------------------------------------------------------------------------------------- round trips
FRAMES = 4  # 2 latent frames of 16 x 16 tokens


@pytest.fixture(scope="module")
def tiny():
    _adapter()
    from calibatt.tinywan.model import load_tinywan
    torch.manual_seed(0)
    return load_tinywan()


def _inputs(model, seed=0, t=640.0):
    from calibatt.tinywan import data, pipeline
    x = pipeline.initial_noise([seed], model.cfg, frames=FRAMES)
    return x, torch.tensor([t]), model.text(data.held_out_captions(1))


def test_diffusers_calibrated_bundle_fits_the_same_model_in_comfyui(tiny, tmp_path):
    from calibatt.tinywan import data, evaluate
    settings = CalibrationSettings(preset="balanced", block_q=64, block_k=64, steps=2)
    bundle = evaluate.calibrate(tiny, data.training_captions(1), settings, steps=2, frames=FRAMES)
    save_bundle(bundle, tmp_path / "from_diffusers.safetensors")
    loaded = load_bundle(tmp_path / "from_diffusers.safetensors")
    # What Patch Model Attention checks (nodes/actions.py): the model's signature when patching, then the grid of
    # the sampled latent (ComfyUI pads each axis up to a whole patch; here the latent divides evenly).
    layout = mi.family_layout(TINYWAN_COMFY)
    comfy_sig = mi.signature_from_config(TINYWAN_COMFY)
    comfy_grid = mi.grid_from_latent(layout, (1, 3, FRAMES, 32, 32))
    loaded.check_compatible(comfy_sig, None)
    loaded.check_compatible(comfy_sig, mi.video_grid_for_check(comfy_grid, loaded.grid))
    # A ComfyUI model of another architecture is still refused, naming the field.
    with pytest.raises(BundleError, match="in_channels=3; this model has in_channels=16"):
        loaded.check_compatible(mi.signature_from_config(dict(TINYWAN_COMFY, in_dim=16)), None)


def _full_bundle(signature, grid, block=64):
    g = BlockGeometry(grid.video_tokens, block, block)
    mask = torch.ones(signature.num_layers, signature.num_heads, g.nq, g.nk, dtype=torch.bool)
    return MaskBundle.from_block_masks(signature, grid, g, [mask], [1.0], [0])


def test_comfyui_bundle_patches_the_same_model_in_diffusers(tiny, tmp_path):
    A = _adapter()
    from calibatt.kernels.runner import SparseRunner
    from calibatt.tinywan import evaluate
    layout = mi.family_layout(TINYWAN_COMFY)
    grid = mi.grid_from_latent(layout, (1, 3, FRAMES, 32, 32))
    save_bundle(_full_bundle(mi.signature_from_config(TINYWAN_COMFY), grid), tmp_path / "from_comfy.safetensors")
    bundle = load_bundle(tmp_path / "from_comfy.safetensors")
    x, t, ctx = _inputs(tiny)
    with torch.no_grad():
        ref = tiny.transformer(x, t, ctx, return_dict=False)[0]
        # dense_cutoff 1.0 keeps the all-keep heads on the block-sparse path, so it computes them.
        with A.patch_sparse(tiny.transformer, bundle, runner=SparseRunner(bundle, dense_cutoff=1.0),
                            **evaluate.HOOK_KW):
            out = tiny.transformer(x, t, ctx, return_dict=False)[0]
    err = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < err < 1e-4, err  # the block-sparse reference computed it, and every block was kept
    # A bundle from a ComfyUI Wan of another architecture is refused before anything runs.
    other = mi.signature_from_config(dict(TINYWAN_COMFY, in_dim=16))
    with pytest.raises(BundleError, match="in_channels=16; this model has in_channels=3"):
        A.patch_sparse(tiny.transformer, _full_bundle(other, grid))


# ------------------------------------------------------------------------------------ stored signatures
def _legacy_bundle(tmp_path, signature, grid=TokenGrid(2, 4, 4), name="legacy.safetensors"):
    save_bundle(_full_bundle(signature, grid, block=8), tmp_path / name)  # the file stores the old document as is
    return load_bundle(tmp_path / name)


@pytest.mark.parametrize("model_type, in_dim, image, camera", [
    ("t2v", 16, False, False), ("i2v", 36, True, False), ("t2v", 36, False, False),
    ("camera", 36, True, True), ("camera_2.2", 36, False, True)])
def test_bundles_the_comfyui_nodes_wrote_before_still_fit(tmp_path, model_type, in_dim, image, camera):
    old = ModelSignature("wan21", 2, 2, 128, 256, {"in_channels": in_dim, "model_type": model_type})
    loaded = _legacy_bundle(tmp_path, old)
    now = mi.signature_from_config(_comfy(model_type=model_type, in_dim=in_dim, dim=256, num_heads=2, num_layers=2))
    assert loaded.signature == now
    assert (now.extra["image_embedding"], now.extra["camera_control"]) == (image, camera)
    loaded.check_compatible(now, None)


def test_bundles_the_diffusers_adapter_wrote_before_still_fit(tmp_path, tiny):
    A = _adapter()
    # The demo's bundles: the tiny model was family "tinywan", with the adapter's {in_channels, patch}.
    old = ModelSignature("tinywan", 6, 4, 32, 128, {"in_channels": 3, "patch": "2x2x2"})
    loaded = _legacy_bundle(tmp_path, old, TokenGrid(2, 16, 16, patch=(2, 2, 2), vae_stride=(1, 1, 1)))
    assert loaded.signature == A.wan_signature(tiny.transformer) == mi.signature_from_config(TINYWAN_COMFY)
    # A Wan 2.2 TI2V-5B bundle made with family "wan22" passed by the caller.
    old5b = ModelSignature("wan22", 30, 24, 128, 3072, {"in_channels": 48, "patch": "1x2x2"})
    d5b, c5b = WAN_CHECKPOINTS["wan22_ti2v_5b"]
    assert _legacy_bundle(tmp_path, old5b, name="5b.safetensors").signature == A.wan_signature_from_config(d5b) \
        == mi.signature_from_config(c5b)


def test_other_stored_signatures(tmp_path):
    old_ltxv = ModelSignature("ltxv", 2, 32, 8, 256, {"in_channels": 128})  # from a file's metadata config
    assert _legacy_bundle(tmp_path, old_ltxv).signature == signatures.ltxv(num_layers=2, num_heads=32, head_dim=8)
    # Signatures that already are today's, or were made in code without host fields, come back unchanged.
    for sig in (mi.signature_from_config(_comfy(dim=256, num_heads=2, num_layers=2)),
                ModelSignature("wan21", 2, 2, 16, 32), ModelSignature("generic", 2, 2, 16, 32),
                signatures.hunyuan_video(num_layers=2, num_heads=2, head_dim=128, in_channels=16, double_blocks=1)):
        assert signatures.current(sig) is sig
        assert _legacy_bundle(tmp_path, sig, name=f"{sig.fingerprint()}.safetensors").signature == sig


def test_calibration_statistics_read_old_signatures_too(tmp_path):
    old = ModelSignature("wan21", 2, 2, 128, 256, {"in_channels": 16, "model_type": "t2v"})
    grid = TokenGrid(2, 4, 4)
    stats = CalibrationStats(old, grid, CalibrationSettings(block_q=8, block_k=8))
    loaded = CalibrationStats.load(stats.save(tmp_path / "stats.safetensors"))
    now = mi.signature_from_config(_comfy(dim=256, num_heads=2, num_layers=2))
    assert loaded.signature == now
    # A run resumed with today's signature merges with them (same model).
    assert loaded.compatibility_problems(CalibrationStats(now, grid, CalibrationSettings(block_q=8, block_k=8))) == []
