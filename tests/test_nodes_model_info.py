"""ModelSignature / TokenGrid derivation from ComfyUI model configs (no ComfyUI needed: plain dicts)."""

import pytest

from calibatt.masks import TokenGrid
from calibatt.nodes import model_info as mi

# unet_config as ComfyUI's model_detection makes it, plus what describe_model fills in from the module.
WAN14B = {"image_model": "wan2.1", "model_type": "t2v", "dim": 5120, "num_heads": 40, "num_layers": 40,
          "in_dim": 16, "out_dim": 16, "patch_size": (1, 2, 2)}
WAN_I2V = dict(WAN14B, model_type="i2v", in_dim=36)
WAN22_5B = {"image_model": "wan2.1", "model_type": "t2v", "dim": 3072, "num_heads": 24, "num_layers": 30,
            "in_dim": 48, "out_dim": 48}
HUNYUAN = {"image_model": "hunyuan_video", "hidden_size": 3072, "num_heads": 24, "depth": 20,
           "depth_single_blocks": 40, "in_channels": 16, "patch_size": [1, 2, 2], "num_layers": 60, "dim": 3072}
MOCHI = {"image_model": "mochi_preview", "depth": 48, "num_heads": 24, "hidden_size_x": 3072, "in_channels": 12,
         "num_layers": 48, "dim": 3072}
LTXV = {"image_model": "ltxv", "num_layers": 28, "attention_head_dim": 64, "num_heads": 32, "dim": 2048}


def test_wan21_signature_and_720p_grid():
    sig = mi.signature_from_config(WAN14B)
    assert (sig.family, sig.num_layers, sig.num_heads, sig.head_dim, sig.dim) == ("wan21", 40, 40, 128, 5120)
    assert sig.extra == {"in_channels": 16, "patch": "1x2x2", "image_embedding": False, "camera_control": False}
    layout = mi.family_layout(WAN14B)
    shape = mi.latent_shape_for(layout, 1280, 720, 81)
    assert shape == [1, 16, 21, 90, 160]
    grid = mi.grid_from_latent(layout, shape)
    assert (grid.frames, grid.height, grid.width, grid.video_tokens) == (21, 45, 80, 75600)  # METHOD.md: 75,600


def test_i2v_and_t2v_signatures_differ():
    t2v, i2v = mi.signature_from_config(WAN14B), mi.signature_from_config(WAN_I2V)
    assert t2v.mismatches(i2v) == [
        "bundle was calibrated for image_embedding=False; this model has image_embedding=True",
        "bundle was calibrated for in_channels=16; this model has in_channels=36"]


def test_wan22_5b_uses_its_vae():
    layout = mi.family_layout(WAN22_5B)
    assert mi.signature_from_config(WAN22_5B).family == "wan22"
    shape = mi.latent_shape_for(layout, 1280, 704, 121)
    assert shape == [1, 48, 31, 44, 80]
    assert mi.grid_from_latent(layout, shape).video_tokens == 31 * 22 * 40


def test_odd_latent_sizes_pad_up_like_comfyui():
    grid = mi.grid_from_latent(mi.family_layout(WAN14B), (2, 16, 3, 9, 11))
    assert (grid.frames, grid.height, grid.width) == (3, 5, 6)


def test_joint_attention_families():
    h = mi.family_layout(HUNYUAN)
    assert h.joint_text and h.bhld
    sig = mi.signature_from_config(HUNYUAN)
    assert (sig.family, sig.num_layers, sig.num_heads, sig.head_dim) == ("hunyuan", 60, 24, 128)
    assert mi.layer_offset(h, HUNYUAN, "single") == 20 and mi.layer_offset(h, HUNYUAN, "double") == 0
    m = mi.family_layout(MOCHI)
    assert m.joint_text and mi.latent_shape_for(m, 848, 480, 163) == [1, 12, 28, 60, 106]
    assert mi.grid_from_latent(m, [1, 12, 28, 60, 106]).video_tokens == 44520  # METHOD.md: 44,520


def test_ltxv_grid_has_no_patching():
    layout = mi.family_layout(LTXV)
    sig = mi.signature_from_config(LTXV)
    assert (sig.family, sig.num_heads, sig.head_dim) == ("ltxv", 32, 64)
    grid = mi.grid_from_latent(layout, mi.latent_shape_for(layout, 768, 512, 97))
    assert (grid.frames, grid.height, grid.width) == (13, 16, 24)


@pytest.mark.parametrize("cfg, words", [
    ({"image_model": "flux"}, "not a supported video model"),
    (dict(WAN14B, model_type="s2v"), "adds tokens"),
    (dict(WAN14B, model_type="vace"), "adds tokens"),
    (dict(HUNYUAN, patch_size=[2, 2]), "image model"),
    (dict(HUNYUAN, patch_size=[1, 1, 1]), "uses 1x1x1 patches"),  # HunyuanImage 2.1 refiner
])
def test_unsupported_models_say_why(cfg, words):
    with pytest.raises(mi.UnsupportedModel, match=words):
        mi.signature_from_config(cfg)


def test_fit_check_ignores_prompt_dependent_text_tokens():
    model = TokenGrid(4, 6, 8)
    bundle = TokenGrid(4, 6, 8, text_tokens=118, text_position="end")
    assert bundle.mismatches(mi.video_grid_for_check(model, bundle)) == []
    other = TokenGrid(4, 6, 10)
    assert bundle.mismatches(mi.video_grid_for_check(other, bundle)) != []


# Wan 2.2 I2V A14B: 36 input channels (noise + mask + image latent) but no CLIP vision projection (img_emb), so
# ComfyUI 0.3.64 detects model_type "t2v" (supported_models.WAN21_T2V).
WAN22_I2V_A14B = dict(WAN14B, in_dim=36)


def test_wan22_i2v_a14b_differs_from_t2v_by_its_input_channels():
    sig = mi.signature_from_config(WAN22_I2V_A14B)
    assert (sig.family, sig.num_layers, sig.num_heads) == ("wan21", 40, 40)
    assert sig.extra == {"in_channels": 36, "patch": "1x2x2", "image_embedding": False, "camera_control": False}
    # Wan 2.1 I2V has the same shape and input channels; its CLIP image projection tells them apart.
    assert mi.signature_from_config(WAN_I2V).mismatches(sig) == [
        "bundle was calibrated for image_embedding=True; this model has image_embedding=False"]
    # A T2V expert's bundle does not fit the I2V expert: the input channels alone tell them apart.
    assert mi.signature_from_config(WAN14B).mismatches(sig) == [
        "bundle was calibrated for in_channels=16; this model has in_channels=36"]
    # The image arrives as extra channels, not tokens: the sampled latent and the token grid are T2V's.
    layout = mi.family_layout(WAN22_I2V_A14B)
    shape = mi.latent_shape_for(layout, 1280, 720, 81)
    assert shape == [1, 16, 21, 90, 160]
    assert mi.grid_from_latent(layout, shape).video_tokens == 75600
