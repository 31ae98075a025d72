"""HunyuanVideo, LTX-Video and Mochi through real ComfyUI model code (set COMFYUI_PATH; see docs/COMFYUI.md).

HunyuanVideo and LTX-Video: tiny random checkpoints in their real formats (written from ComfyUI's own model
classes, tests/comfyui_families.py) are loaded by the stock UNETLoader of a headless ComfyUI and sampled through
Patch Model Attention with bundles the engine builds for the signature and grid the nodes read off the model.
Mochi, whose detection hard-codes the full 48 x 3072 size, is built in-process from ComfyUI's Mochi class and
sampled with comfy.sample.sample after the same patch action.

Routing is checked three ways: a bundle that keeps every block matches the unpatched run; a banded bundle changes
the output by a bounded amount (so calls really went through the sparse path); the per-run summary line
("N self-attention calls routed over E model evaluations") shows every self-attention call of every evaluation
was routed, none passed through. In-process, with the dense cutoff at 1, the all-keep bundle also runs the
block-sparse path itself (text keys, HunyuanVideo's padding mask, Mochi's cropped text) and must match dense, and
each routed HunyuanVideo call of a banded bundle must equal the sparse reference with the masks on the tokens that
really are the video (ComfyUI 0.3.x puts the text after the video, 0.19+ before it: run the module on both).
"""

from __future__ import annotations

import re

import pytest
import torch

import comfyui_families as F
import comfyui_harness as H

pytestmark = H.NEEDS_COMFYUI

from calibatt.masks import load_bundle, save_bundle  # noqa: E402

STEPS = 3
BLOCK = 16
TEXT = 16  # text tokens per prompt
HUNYUAN_PADDED = 5  # of which padding, in the padding-mask runs
# Video sizes giving 3 x 4 x 8 = 96 tokens in both families.
HUNYUAN_VIDEO = {"width": 128, "height": 64, "length": 9}  # latent [1, 16, 3, 8, 16], patches 1x2x2
LTXV_VIDEO = {"width": 256, "height": 128, "length": 17}  # latent [1, 128, 3, 4, 8], no patching
MOCHI_LATENT = [1, 12, 3, 8, 16]
SUMMARY = re.compile(r"Patch Model Attention: (\d+) self-attention calls routed over (\d+) model evaluations "
                     r"\((\d+) layers\)")

rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731


# --------------------------------------------------------------------------------------------- model facts


@pytest.fixture(scope="module")
def hunyuan_sd():
    return F.tiny_hunyuan_state_dict()


@pytest.fixture(scope="module")
def ltxv_sd():
    return F.tiny_ltxv_state_dict()


@pytest.fixture(scope="module")
def facts(hunyuan_sd, ltxv_sd):
    return {"hunyuan": F.model_facts(F.load_model(hunyuan_sd), HUNYUAN_VIDEO),
            "ltxv": F.model_facts(F.load_model(ltxv_sd), LTXV_VIDEO)}


def test_tiny_checkpoints_detect_as_their_family(hunyuan_sd, ltxv_sd, facts):
    """ComfyUI's own detection maps the written files back to the intended tiny configs, and the nodes read the
    intended signatures off the loaded models."""
    cfg = F.detect(hunyuan_sd)
    want = {k: F.HUNYUAN_CONFIG[k] for k in ("hidden_size", "num_heads", "depth", "depth_single_blocks",
                                               "context_in_dim", "in_channels", "patch_size", "vec_in_dim",
                                               "guidance_embed")}
    assert {k: cfg[k] for k in want} == want
    assert cfg["image_model"] == "hunyuan_video"
    cfg = F.detect(ltxv_sd)
    assert (cfg["image_model"], cfg["num_layers"], cfg["attention_head_dim"], cfg["cross_attention_dim"]) == \
        ("ltxv", 2, 8, 256)

    sig, layout, grid = facts["hunyuan"]
    assert (sig.family, sig.num_layers, sig.num_heads, sig.head_dim, sig.dim) == ("hunyuan", 2, 2, 128, 256)
    assert sig.extra == {"in_channels": 16, "double_blocks": 1}
    assert layout.joint_text and (grid.frames, grid.height, grid.width) == (3, 4, 8)
    sig, layout, grid = facts["ltxv"]
    assert (sig.family, sig.num_layers, sig.num_heads, sig.head_dim, sig.dim) == ("ltxv", 2, 32, 8, 256)
    assert not layout.joint_text and (grid.frames, grid.height, grid.width) == (3, 4, 8)


# --------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def comfy(hunyuan_sd, ltxv_sd, facts):
    from safetensors.torch import save_file

    base = H.make_base_dir()
    H.ComfyServer.prepare_base(base)
    (base / "custom_nodes" / "calibatt_family_test_nodes.py").write_text(F.FAMILY_NODE_SOURCE)
    save_file(hunyuan_sd, str(base / "models/diffusion_models/tiny_hunyuan.safetensors"))
    save_file(ltxv_sd, str(base / "models/diffusion_models/tiny_ltxv.safetensors"))
    folder = base / "models" / "sparse_attention"
    for family in ("hunyuan", "ltxv"):
        sig, _, grid = facts[family]
        for kind in ("full", "band"):
            save_bundle(F.kind_bundle(sig, grid, kind, BLOCK), folder / f"{family}_{kind}.safetensors")
    server = H.ComfyServer(F.COMFY, base, env_extra={"PYTHONUNBUFFERED": "1"})
    server.start()
    yield server
    server.stop()
    H.remove_base_dir(base)





def _graph(family: str, padded: int = 0, tokens: int = TEXT, prompts: int = 1, tokens_step: int = 0):
    if family == "hunyuan":
        unet, width, pooled, latent = "tiny_hunyuan.safetensors", F.HUNYUAN_CONFIG["context_in_dim"], 768, \
            {"class_type": "EmptyHunyuanLatentVideo", "inputs": dict(HUNYUAN_VIDEO, batch_size=1)}
    else:
        # LTX-Video's model takes the text mask as a required input (its T5 encoder always sends one); it only
        # reaches the cross-attention.
        unet, width, pooled, latent = "tiny_ltxv.safetensors", 4096, 0, \
            {"class_type": "EmptyLTXVLatentVideo", "inputs": dict(LTXV_VIDEO, batch_size=1)}
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "cond": {"class_type": "CalibAttTestFamilyConditioning", "inputs": {
            "seed": 7, "prompts": prompts, "tokens": tokens, "tokens_step": tokens_step, "width": width,
            "padded": padded, "pooled_width": pooled}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["cond", 0]}},
        "latent": latent,
    }


def _patch_and_sample(p, family: str, bundles: dict, cfg: float = 3.0):
    """Add the unpatched sampler ("dense") and one patched sampler per bundle {name: file} (same seed, inputs)."""
    samplers = {"dense": ["unet", 0]}
    for name, file in bundles.items():
        p[f"load_{name}"] = {"class_type": "LoadMaskBundle", "inputs": {"bundle_name": file}}
        p[f"patch_{name}"] = {"class_type": "PatchModelAttention", "inputs": {
            "model": ["unet", 0], "bundle": [f"load_{name}", 0], "dense_first_percent": 0.0,
            "dense_last_percent": 0.0, "quality": 0.0}}
        samplers[name] = [f"patch_{name}", 0]
    for name, model in samplers.items():
        p[f"ks_{name}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 3, "steps": STEPS, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["cond", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
        p[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"ks_{name}", 0],
                                                                    "filename_prefix": f"latents/{family}_{name}"}}
    return list(samplers)


def _sample_family(server, family: str, padded: int = 0, cfg: float = 3.0, tokens: int = TEXT,
                   bundles: dict = None) -> dict:
    p = _graph(family, padded=padded, tokens=tokens)
    bundles = bundles or {kind: f"{family}_{kind}.safetensors" for kind in ("full", "band")}
    names = _patch_and_sample(p, family, bundles, cfg=cfg)
    entry, log_text = F.run_logged(server, p)
    out = {name: F.read_latent(server, entry, f"save_{name}") for name in names}
    out["summaries"] = [tuple(int(x) for x in m) for m in SUMMARY.findall(log_text)]
    out["log"] = log_text
    return out


def _assert_every_self_attention_routed(run: dict, num_layers: int, patched_runs: int = 2):
    assert len(run["summaries"]) == patched_runs, run["log"][-3000:]
    for routed, evaluations, layers in run["summaries"]:
        assert layers == num_layers and evaluations >= STEPS
        assert routed == evaluations * num_layers, (routed, evaluations, layers)


def _assert_bounded_sparse_effect(run: dict):
    for name in ("dense", "full", "band"):
        assert torch.isfinite(run[name]).all(), name
    # Every block kept: the routed path reproduces dense attention (layouts, heads, text tokens all right).
    assert rel(run["full"], run["dense"]) < 1e-3, rel(run["full"], run["dense"])
    # The banded bundle skips blocks: a real, bounded change (random tiny weights attend diffusely, so the
    # change is larger than on a trained model).
    d = rel(run["band"], run["dense"])
    assert 1e-5 < d < 0.5, d


@pytest.fixture(scope="module")
def hunyuan_run(comfy):
    return _sample_family(comfy, "hunyuan")


@pytest.fixture(scope="module")
def hunyuan_masked_run(comfy):
    # cfg 1, as HunyuanVideo is used (guidance-distilled): ComfyUI 0.3.64's HunyuanVideo builds its joint mask for
    # one batch row and fails on a batched positive + negative that carry a mask.
    return _sample_family(comfy, "hunyuan", padded=HUNYUAN_PADDED, cfg=1.0)


def test_hunyuan_sparse_sampling(hunyuan_run, facts):
    """HunyuanVideo prompt without padding (ComfyUI's encoder drops an all-ones mask): both the double- and the
    single-stream block's joint self-attention are routed, with the text tokens appended."""
    _assert_bounded_sparse_effect(hunyuan_run)
    _assert_every_self_attention_routed(hunyuan_run, facts["hunyuan"][0].num_layers)


def test_hunyuan_padding_mask_sparse_sampling(hunyuan_masked_run, facts):
    """A padded prompt (attention_mask in the conditioning, as HunyuanVideo's text encoder sends when it pads):
    the masked joint self-attention is routed too (the padded text keys masked on the sparse path), keeping every
    block still matches dense, and the banded bundle changes the output boundedly."""
    _assert_every_self_attention_routed(hunyuan_masked_run, facts["hunyuan"][0].num_layers)
    _assert_bounded_sparse_effect(hunyuan_masked_run)


def test_ltxv_sparse_sampling(comfy, facts):
    """LTX-Video: self-attention (attn1, no mask) of each block routed; cross-attention (masked) passes."""
    run = _sample_family(comfy, "ltxv", padded=4)
    _assert_bounded_sparse_effect(run)
    _assert_every_self_attention_routed(run, facts["ltxv"][0].num_layers)


def _calibrate(server, family: str, padded: int, name: str, cfg: float = 3.0):
    p = _graph(family, padded=padded, prompts=2, tokens_step=4)  # prompts of 16 and 20 text tokens
    p["calib"] = {"class_type": "CalibrateSparseAttention", "inputs": dict(
        HUNYUAN_VIDEO if family == "hunyuan" else LTXV_VIDEO, model=["unet", 0], prompts="", steps=STEPS,
        cfg=cfg, sampler_name="euler", scheduler="simple", seed=11, preset="custom", eps_A=0.4, eps_C=0.6,
        eps_k=4.0, rho=0.5, filename=name, positive=["cond", 0], block_size=BLOCK)}
    p["preview"] = {"class_type": "SaveImage", "inputs": {"images": ["calib", 1], "filename_prefix": name}}
    del p["neg"]
    offset = server.log_path.stat().st_size
    entry = server.run(p, timeout=300)
    err = H.status_error(entry)
    path = server.base / "models" / "sparse_attention" / f"{name}.safetensors"
    assert err is None and path.is_file(), f"{err}\n{F.log_since(server, offset)[-3000:]}"
    return load_bundle(path)


def _check_calibrated(bundle, facts, family: str):
    sig, _, grid = facts[family]
    assert bundle.signature == sig
    assert (bundle.grid.frames, bundle.grid.height, bundle.grid.width) == (grid.frames, grid.height, grid.width)
    assert bundle.settings["prompts"] == 2 and len(bundle.calibrated_sigmas) == STEPS
    # Random tiny weights attend diffusely; with eps 0.4-0.6 the bundle must still skip blocks, and stay below the
    # runner's dense cutoff so the patched run below takes the sparse path.
    assert 0.05 < bundle.density < 0.85, bundle.summary()


def _sample_with_calibrated(server, family: str, name: str, padded: int, cfg: float, num_layers: int):
    """The calibrated bundle patches a prompt of yet another text length (24 tokens; joint-text bundles fit any
    prompt): every self-attention call is routed and the output changes boundedly."""
    run = _sample_family(server, family, padded=padded, cfg=cfg, tokens=24,
                         bundles={"calibrated": f"{name}.safetensors"})
    _assert_every_self_attention_routed(run, num_layers, patched_runs=1)
    assert torch.isfinite(run["calibrated"]).all()
    d = rel(run["calibrated"], run["dense"])
    assert 1e-5 < d < 0.5, d


@pytest.mark.parametrize("family, padded, cfg", [
    ("hunyuan", 0, 3.0),  # text lengths 16 and 20 in the joint self-attention
    ("hunyuan", HUNYUAN_PADDED, 1.0),  # padded prompts: the mask reaches the calibration statistics
    ("ltxv", 4, 3.0),  # text only in the cross-attention (its mask is required there)
], ids=["hunyuan", "hunyuan_padded", "ltxv"])
def test_calibrate_two_prompts_then_patch(comfy, facts, family, padded, cfg):
    name = f"{family}_calibrated_{padded}"
    _check_calibrated(_calibrate(comfy, family, padded=padded, name=name, cfg=cfg), facts, family)
    _sample_with_calibrated(comfy, family, name, padded, cfg, facts[family][0].num_layers)


# --------------------------------------------------------------------------------------------- Mochi, in-process
@pytest.fixture(scope="module")
def mochi():
    return F.tiny_mochi_model()


def test_mochi_routes_cropped_text_and_matches_dense(mochi):
    """Mochi crops the text to the prompt's valid tokens inside self-attention (num_tokens = mask sum), so a
    positive prompt with 7 valid tokens and a negative with 12 give calls of 96 + 7 and 96 + 12 tokens; each
    is routed with that text count."""
    F.import_comfy()
    import comfy.sample
    from calibatt.nodes.actions import patch_model_attention

    sig, layout, grid = F.model_facts(mochi, latent_shape=MOCHI_LATENT)
    assert (sig.family, sig.num_layers, sig.num_heads, sig.head_dim) == ("mochi", 2, 2, 128)
    assert layout.joint_text and grid.video_tokens == 96

    g = torch.Generator().manual_seed(0)

    def prompt(valid):
        mask = torch.zeros(1, TEXT, dtype=torch.long)
        mask[:, :valid] = 1
        return [[torch.randn(1, TEXT, F.MOCHI_CONFIG["t5_feat_dim"], generator=g), {"attention_mask": mask}]]

    positive, negative = prompt(7), prompt(12)
    latent = torch.zeros(MOCHI_LATENT)
    noise = torch.randn(MOCHI_LATENT, generator=torch.Generator().manual_seed(1))

    def sample(model):
        return comfy.sample.sample(model, noise, STEPS, 3.0, "euler", "simple", positive, negative, latent,
                                   seed=1, disable_pbar=True)

    dense = sample(mochi)
    out, seen = {}, {}
    for kind in ("full", "band"):
        patched = patch_model_attention(mochi, F.kind_bundle(sig, grid, kind, BLOCK))
        router = patched.model_options["transformer_options"]["optimized_attention_override"].router
        calls = seen[kind] = []
        handler = router.handler

        def spy(call, handler=handler, calls=calls):  # the real runner, with a record of what reached it
            calls.append((call.layer, call.grid.text_tokens, call.seq_len))
            return handler(call)

        router.handler = spy
        out[kind] = sample(patched)
        assert router.passed == 0  # Mochi has no other attention calls
        assert router.routed == len(calls)
    for calls in seen.values():
        assert sorted(set(calls)) == [(0, 7, 103), (0, 12, 108), (1, 7, 103), (1, 12, 108)]
        # Positive and negative differ in num_tokens, so ComfyUI evaluates them separately: one call per layer
        # per prompt per step.
        assert len(calls) == STEPS * 2 * sig.num_layers
    assert rel(out["full"], dense) < 1e-3, rel(out["full"], dense)
    d = rel(out["band"], dense)
    assert 1e-5 < d < 0.5, d



# ------------------------------------------------------------------ the sparse kernel path itself, in-process
def _prompt(width: int, valid: int, pooled: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    extra = {"attention_mask": (torch.arange(TEXT) < valid).long()[None]}
    if pooled:
        extra["pooled_output"] = torch.randn(1, pooled, generator=g)
    return [[torch.randn(1, TEXT, width, generator=g), extra]]


# family -> (model builder, latent, positive, negative, cfg, routed calls expected over the 3 steps)
IN_PROCESS = {
    # cfg 1 (one evaluation per step), 11 of 16 text tokens valid: the mask reaches the joint self-attention.
    "hunyuan_masked": (lambda: F.load_model(F.tiny_hunyuan_state_dict()), [1, 16, 3, 8, 16],
                       lambda: _prompt(64, TEXT - HUNYUAN_PADDED, 768, 1),
                       lambda: _prompt(64, TEXT - HUNYUAN_PADDED, 768, 2), 1.0, STEPS * 2),
    # positive + negative batched into one evaluation per step.
    "ltxv": (lambda: F.load_model(F.tiny_ltxv_state_dict()), [1, 128, 3, 4, 8],
             lambda: _prompt(4096, 12, 0, 1), lambda: _prompt(4096, 12, 0, 2), 3.0, STEPS * 2),
    # 7 and 12 valid text tokens: positive and negative evaluated separately.
    "mochi": (F.tiny_mochi_model, MOCHI_LATENT, lambda: _prompt(64, 7, 0, 1), lambda: _prompt(64, 12, 0, 2),
              3.0, STEPS * 2 * 2),
}


@pytest.mark.parametrize("case", sorted(IN_PROCESS))
def test_all_keep_bundle_through_the_sparse_kernel_path_matches_dense(case):
    """The patch node sends an all-keep bundle's heads to dense attention (they are above the dense cutoff); here
    the router is installed as the node installs it but with the cutoff at 1, so every head of every routed call
    runs the sparse kernel path (text keys, HunyuanVideo's padding mask, Mochi's cropped text included) and must
    reproduce the unpatched model."""
    F.import_comfy()
    import comfy.sample
    from calibatt.kernels.runner import SparseRunner
    from calibatt.nodes.comfy_glue import describe_model, install
    from calibatt.nodes.routing import AttentionRouter

    build, latent_shape, positive, negative, cfg, expected = IN_PROCESS[case]
    model = build()
    sig, layout, grid = F.model_facts(model, latent_shape=latent_shape)
    runner = SparseRunner(F.kind_bundle(sig, grid, "full", BLOCK), dense_cutoff=1.0)
    router = AttentionRouter(sig, layout, describe_model(model), handler=runner, step_hook=runner.begin_step)
    calls = []
    router.handler = lambda call: (calls.append(runner.route(call.layer)), runner(call))[1]
    patched = install(model, router, describe_model(model), on_end=runner.end)

    pos, neg = positive(), negative()
    latent = torch.zeros(latent_shape)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(1))
    out = [comfy.sample.sample(m, noise, STEPS, cfg, "euler", "simple", pos, neg, latent, seed=1,
                               disable_pbar=True) for m in (model, patched)]
    assert router.routed == expected and calls == ["sparse"] * expected, (router.routed, set(calls))
    assert torch.isfinite(out[1]).all()
    assert rel(out[1], out[0]) < 1e-4, rel(out[1], out[0])


# ------------------------------------------------- HunyuanVideo: the masks land on the true video tokens, in-process
def _video_ids(grid) -> torch.Tensor:
    """(V, 3) integer (t, h, w) of each video token in frame-major order: HunyuanVideo's RoPE ids of the video."""
    t, h, w = torch.meshgrid(torch.arange(grid.frames), torch.arange(grid.height), torch.arange(grid.width),
                             indexing="ij")
    return torch.stack([t, h, w], -1).reshape(-1, 3).float()


def _true_video_start(ids: torch.Tensor, video_ids: torch.Tensor) -> int:
    """Where the video sits in a joint sequence, from the ids the model fed its RoPE embedder: RoPE rotates query
    and key row i by the position in ids row i, so the V rows carrying the video tokens' (t, h, w), in order, are
    the video, and every other row must be a text row (id 0). Read off the model's own input, not from anything
    the router looks at, and whatever the ComfyUI version."""
    ids = ids[0].float().cpu()
    L, V = ids.shape[0], video_ids.shape[0]
    starts = [o for o in range(L - V + 1) if torch.equal(ids[o:o + V], video_ids)]
    assert len(starts) == 1, starts
    o = starts[0]
    assert not torch.cat([ids[:o], ids[o + V:]]).any()
    return o


@pytest.mark.parametrize("padded, cfg", [(0, 3.0), (HUNYUAN_PADDED, 1.0)], ids=["unpadded", "padded"])
def test_hunyuan_sparse_attention_is_the_reference_on_the_true_video_tokens(hunyuan_sd, padded, cfg):
    """Patch Model Attention with the banded bundle (not all-keep: the placement matters), real HunyuanVideo model
    code sampling in-process. Every routed call's output must equal the engine's sparse reference computed on that
    call's q/k/v with the masks on the tokens that really are the video (found from the RoPE ids the model used,
    see _true_video_start) and, with a padded prompt, the padding mask's text part as the text bias. Placing the
    masks on the wrong tokens (what routing assumed before newer ComfyUI put the text first) must fail the check,
    so this test would have caught that."""
    F.import_comfy()
    import comfy.sample
    from calibatt.kernels.attention.naive import sparse_attention_reference
    from calibatt.nodes.actions import patch_model_attention

    model = F.load_model(hunyuan_sd)
    latent_shape = [1, 16, 3, 8, 16]
    sig, _, grid = F.model_facts(model, latent_shape=latent_shape)
    V = grid.video_tokens
    bundle = F.kind_bundle(sig, grid, "band", BLOCK)
    patched = patch_model_attention(model, bundle)
    to = patched.model_options["transformer_options"]
    router = to["optimized_attention_override"].router

    # What the routed calls received and returned, and the RoPE ids of the evaluation they belong to.
    ids_seen, records, current = [], [], [None]
    hook = patched.model.diffusion_model.pe_embedder.register_forward_hook(
        lambda module, inputs, output: ids_seen.append(inputs[0].detach().clone()))
    handler = router.handler

    def mark(call):
        current[0].update(layer=call.layer, sigma=call.sigma, position=call.grid.text_position)
        return handler(call)

    router.handler = mark

    # The spy wraps the router's own call (the installed override object stays in place: the patch puts its router
    # first again in every evaluation, so replacing the override would hide the routed calls from the spy).
    router_call = type(router).__call__

    def spy(self, func, *args, **kwargs):
        current[0] = rec = {}
        out = router_call(self, func, *args, **kwargs)
        if rec:
            rec.update(qkv=[a.detach().clone() for a in args[:3]], mask=kwargs.get("mask"), out=out.clone(),
                       ids=ids_seen[-1])
            records.append(rec)
        return out

    type(router).__call__ = spy
    pos, neg = _prompt(64, TEXT - padded, 768, 1), _prompt(64, TEXT - padded, 768, 2)
    if not padded:  # ComfyUI's text encoders drop an all-ones mask: an unpadded prompt carries none
        for c in (pos, neg):
            del c[0][1]["attention_mask"]
    latent = torch.zeros(latent_shape)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(1))
    try:
        comfy.sample.sample(patched, noise, STEPS, cfg, "euler", "simple", pos, neg, latent, seed=1,
                            disable_pbar=True)
    finally:
        hook.remove()
        type(router).__call__ = router_call

    evaluations = STEPS  # cfg 3: positive and negative batched into one evaluation per step; cfg 1: positive only
    assert len(records) == evaluations * sig.num_layers == router.routed, (len(records), router.routed)
    video_ids = _video_ids(grid)
    errors, wrong = [], []
    for rec in records:
        q, k, v = rec["qkv"]  # (B, H, L, D): HunyuanVideo's attention passes skip_reshape
        L = q.shape[2]
        assert L - V == TEXT
        o = _true_video_start(rec["ids"], video_ids)
        assert rec["position"] == ("start" if o else "end")
        mask = rec["mask"].reshape(-1, L).float() if padded else None
        if padded:  # the padded text keys, and only they, carry the mask
            text = [i for i in range(L) if not o <= i < o + V]
            assert int((mask[:, text] != 0).sum()) == padded and not mask[:, o:o + V].any()
        else:
            assert rec["mask"] is None
        skip = bundle.skip_lists(bundle.bucket_for_sigma(rec["sigma"])).layer(rec["layer"])

        def reference(start):
            """The sparse reference with the masks on tokens [start, start + V): video moved first (the
            reference's own order), the rest as text with the mask's entries there as its bias, moved back."""
            order = torch.tensor(list(range(start, start + V)) + [i for i in range(L) if not start <= i < start + V])
            tb = None if mask is None else mask[:, order[V:]]
            ref = sparse_attention_reference(*(t[:, :, order] for t in (q, k, v)), skip, text_bias=tb)
            ref = ref[:, :, torch.argsort(order)]
            return ref.transpose(1, 2).reshape(rec["out"].shape)  # ComfyUI's (B, L, H*D) output

        errors.append(rel(rec["out"], reference(o)))
        wrong.append(rel(rec["out"], reference(TEXT if o == 0 else 0)))
    assert max(errors) < 1e-5, errors
    assert min(wrong) > 1e-3, wrong  # the check sees masks on the wrong tokens


def _with_block_patch(model, layout, patch_for):
    """A clone of `model` with patch_for(block_name, index) installed as every block's "dit" patch: another node's
    block patch, there before ours."""
    from calibatt.nodes.comfy_glue import block_keys, describe_model

    other = model.clone()
    for name, index, _ in block_keys(layout, describe_model(model)):
        other.set_model_patch_replace(patch_for(name, index), "dit", name, index)
    return other


def _unpadded_inputs(latent_shape):
    """(positive, negative, latent, noise) of an in-process HunyuanVideo run with unpadded prompts (ComfyUI's text
    encoders drop an all-ones mask, so they carry none)."""
    pos, neg = _prompt(64, TEXT, 768, 1), _prompt(64, TEXT, 768, 2)
    for c in (pos, neg):
        del c[0][1]["attention_mask"]
    latent = torch.zeros(latent_shape)
    return pos, neg, latent, torch.randn(latent_shape, generator=torch.Generator().manual_seed(1))


def test_block_patches_already_there_stay_chained(hunyuan_sd):
    """A "dit" block patch another node installed before ours keeps running (ours wraps it, then hands it the
    block), on every block of every evaluation, and the text position is still read from the host: the output is
    bit-identical to the same patch without the other one, and every self-attention call is routed."""
    F.import_comfy()
    import comfy.sample
    from calibatt.nodes.actions import patch_model_attention

    model = F.load_model(hunyuan_sd)
    latent_shape = [1, 16, 3, 8, 16]
    sig, layout, grid = F.model_facts(model, latent_shape=latent_shape)
    bundle = F.kind_bundle(sig, grid, "band", BLOCK)
    seen = []

    def other_patch(name, index):
        def patch(args, extra):
            seen.append((name, index, "pe" in args))
            return extra["original_block"](args)
        return patch

    other = _with_block_patch(model, layout, other_patch)
    pos, neg, latent, noise = _unpadded_inputs(latent_shape)
    out = {}
    for key, base in (("alone", model), ("chained", other)):
        patched = patch_model_attention(base, bundle)
        router = patched.model_options["transformer_options"]["optimized_attention_override"].router
        out[key] = comfy.sample.sample(patched, noise, STEPS, 3.0, "euler", "simple", pos, neg, latent, seed=1,
                                       disable_pbar=True)
        assert router.routed == STEPS * sig.num_layers, (key, router.routed)
    assert sorted(set(seen)) == [("double_block", 0, True), ("single_block", 0, True)]
    assert len(seen) == STEPS * sig.num_layers
    assert torch.equal(out["alone"], out["chained"])


def test_hunyuan_reference_latent_runs_dense(caplog):
    """HunyuanVideo I2V with "custom" guidance prepends the reference image's tokens to the video tokens; a bundle
    for the video grid does not describe those calls, so such evaluations run dense (with a warning) instead of
    taking the reference tokens for video and part of the video for text."""
    import logging

    F.import_comfy()
    import comfy.sample
    from calibatt.nodes.actions import patch_model_attention

    model = F.load_model(F.tiny_hunyuan_state_dict())
    sig, _, grid = F.model_facts(model, latent_shape=[1, 16, 3, 8, 16])
    g = torch.Generator().manual_seed(4)
    pos = _prompt(64, TEXT, 768, 1)
    pos[0][1]["ref_latent"] = torch.randn(1, 16, 1, 8, 16, generator=g)
    neg = _prompt(64, TEXT, 768, 2)
    latent = torch.zeros(1, 16, 3, 8, 16)
    noise = torch.randn(latent.shape, generator=g)
    patched = patch_model_attention(model, F.kind_bundle(sig, grid, "band", BLOCK))
    router = patched.model_options["transformer_options"]["optimized_attention_override"].router
    with caplog.at_level(logging.INFO, logger="calibatt"):
        out = [comfy.sample.sample(m, noise, STEPS, 1.0, "euler", "simple", pos, neg, latent, seed=1,
                                   disable_pbar=True) for m in (model, patched)]
    assert router.routed == 0
    assert torch.equal(out[0], out[1])
    assert "the conditioning carries ref_latent, which adds tokens to the video sequence" in caplog.text
    assert "0 self-attention calls routed over 3 model evaluations" in caplog.text


def test_last_double_block_output_is_freed_before_the_single_blocks(hunyuan_sd):
    """HunyuanVideo's forward_orig keeps the dict a "double_block" patch returned alive in its loop variable while
    the first single block runs, so any block patch holds the last double block's video activations (1.46 GB at
    720p x 129, CFG 2) at the step's memory peak. Patch Model Attention lets go of them: when the first single
    block starts, nothing references the last double block's output any more. The control (another node's plain
    block patch, no ours) shows the host keeping it, so the check can fail."""
    import gc
    import weakref

    F.import_comfy()
    import comfy.sample
    from calibatt.nodes.actions import patch_model_attention

    model = F.load_model(hunyuan_sd)
    latent_shape = [1, 16, 3, 8, 16]
    sig, layout, grid = F.model_facts(model, latent_shape=latent_shape)
    bundle = F.kind_bundle(sig, grid, "band", BLOCK)
    dm = model.model.diffusion_model
    last_double = dm.double_blocks[len(dm.double_blocks) - 1]
    refs, alive = [], []

    def before_first_single(module, inputs):
        gc.collect()
        alive.append(refs[-1]() is not None)

    hooks = [last_double.register_forward_hook(lambda mod, i, out: refs.append(weakref.ref(out[0]))),
             dm.single_blocks[0].register_forward_pre_hook(before_first_single)]

    def plain_patch(args, extra):
        return extra["original_block"](args)

    control = _with_block_patch(model, layout, lambda name, index: plain_patch)
    pos, neg, latent, noise = _unpadded_inputs(latent_shape)
    seen = {}
    try:
        for key, m in (("control", control), ("ours", patch_model_attention(model, bundle)),
                       ("ours over another patch", patch_model_attention(control, bundle))):
            alive.clear()
            comfy.sample.sample(m, noise, 2, 3.0, "euler", "simple", pos, neg, latent, seed=1, disable_pbar=True)
            seen[key] = list(alive)
    finally:
        for h in hooks:
            h.remove()
    assert seen["control"] == [True, True], seen
    assert seen["ours"] == [False, False], seen
    assert seen["ours over another patch"] == [False, False], seen
