"""Model files users load instead of the plain checkpoint, written tiny for tests/test_nodes_comfyui_model_variants.py:
a LoRA for the tiny Wan 2.1 (tests/comfyui_harness.tiny_wan_state_dict), the same weights as a GGUF file, and the
ComfyUI-GGUF custom node (a public repository, used as a test fixture: extracted into the temporary custom_nodes,
never committed here).

- LoRA: the key format ComfyUI's LoraLoaderModelOnly takes for Wan and real Wan LoRAs use (LightX2V's
  distillation LoRAs among them): `diffusion_model.<module>.lora_A.weight` [rank, in] / `.lora_B.weight`
  [out, rank] with an `.alpha` scalar, and `diffusion_model.<module>.diff_b` for a bias difference. ComfyUI's
  generic key map (comfy/lora.py model_lora_keys_unet: "diffusion_model.<key without .weight>") resolves them in
  every version since 0.3.x; a key it cannot place is logged as "lora key not loaded".
- GGUF: what city96's tools/convert.py writes for Wan (architecture "wan", keys without prefix): 2-D weights large
  enough quantized (Q8_0 for the attention projections, Q4_0 for the rest), 1-D tensors and the modulation
  parameters in F32, the 5-D patch embedding in F16 (as its fix_5d_tensors.py adds it back).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

GGUF_NODE_DIR = "ComfyUI-GGUF"
LORA_RANK = 4


def tiny_wan_lora(base_sd: dict, rank: int = LORA_RANK, scale: float = 1.0, seed: int = 0) -> dict:
    """A LoRA on every attention projection and feed-forward matrix of the tiny Wan, plus a bias difference on
    each first feed-forward layer and weight differences on the self-attention q / k norms. With `scale` 1 the low-rank update is about as large as the weights it adds to
    (rank-4, so it redirects a few directions strongly): a change the sampled output shows clearly."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key, w in base_sd.items():
        if not (key.startswith("blocks.") and key.endswith(".weight") and w.dim() == 2):
            continue
        if not any(part in key for part in ("_attn.q.", "_attn.k.", "_attn.v.", "_attn.o.", ".ffn.")):
            continue
        out_dim, in_dim = w.shape
        name = "diffusion_model." + key[: -len(".weight")]
        # alpha / rank * B @ A: with A ~ N(0, 1/in) and B ~ N(0, scale / rank) its rows have the norm of the
        # weight rows (N(0, 1/in) each), scaled by `scale`.
        lora[name + ".lora_A.weight"] = (torch.randn(rank, in_dim, generator=g) * in_dim ** -0.5).to(torch.float16)
        lora[name + ".lora_B.weight"] = (torch.randn(out_dim, rank, generator=g) * scale * rank ** -0.5
                                         ).to(torch.float16)
        lora[name + ".alpha"] = torch.tensor(float(rank))
        if key.endswith(".ffn.0.weight"):
            lora[name + ".diff_b"] = (torch.randn(out_dim, generator=g) * 0.1).to(torch.float16)
    for key, w in base_sd.items():
        if key.startswith("blocks.") and (key.endswith("self_attn.norm_q.weight")
                                          or key.endswith("self_attn.norm_k.weight")):
            # Weight differences on the q / k RMSNorm scales (x3 each, logits x9): the random model's diffuse
            # self-attention gets peaked enough that a few-step schedule's eps of 0.76-0.86 leaves key blocks to
            # skip. Measured (2 prompts, the distilled preset, 4 steps): density 1.0 without, 0.90 at x2, 0.80 here.
            lora["diffusion_model." + key[: -len(".weight")] + ".diff"] = torch.ones_like(w) * (2.0 * scale)
    return lora


def gguf_importable() -> str | None:
    """None when the `gguf` package imports in this interpreter (the one the server runs with), else why not."""
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        return (f"needs the gguf package (pip install gguf) in the Python that runs ComfyUI, {sys.executable} "
                f"({e})")
    return None


def write_tiny_wan_gguf(state_dict: dict, path: Path) -> dict:
    """Write `state_dict` (the tiny Wan, float16) as a GGUF file as ComfyUI-GGUF's converter lays out a Wan model;
    -> {quantization type name: tensor count}."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    counts: dict = {}
    for key, t in state_dict.items():
        a = t.float().numpy()
        if a.ndim == 2 and a.size > 1024 and a.shape[-1] % 32 == 0:
            qtype = Q.Q8_0 if "_attn." in key else Q.Q4_0
            data = gguf.quants.quantize(a.astype(np.float32), qtype)
        elif a.ndim >= 2 and "modulation" not in key:
            qtype, data = Q.F16, a.astype(np.float16)
        else:  # 1-D tensors and the modulation parameters (an nn.Parameter the loader reads as is)
            qtype, data = Q.F32, a.astype(np.float32)
        writer.add_tensor(key, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def gguf_node_source() -> str:
    """The bare git directory of ComfyUI-GGUF: $CALIBATT_GGUF_NODE_GIT (no default: where a clone of it lives is
    the machine's business), or "" when unset."""
    return os.environ.get("CALIBATT_GGUF_NODE_GIT", "")


def gguf_node_missing() -> str | None:
    """None when ComfyUI-GGUF's code and the gguf package are both at hand, else the reason to skip."""
    src = gguf_node_source()
    if not src or not os.path.isdir(src) or shutil.which("git") is None:
        return ("needs ComfyUI-GGUF's code: set CALIBATT_GGUF_NODE_GIT to a bare git directory of "
                f"github.com/city96/ComfyUI-GGUF (now {src or 'unset'}), and git")
    return gguf_importable()


def extract_gguf_node(custom_nodes: Path) -> Path:
    """`git archive HEAD` of ComfyUI-GGUF into custom_nodes/ComfyUI-GGUF (test fixture only)."""
    dest = Path(custom_nodes) / GGUF_NODE_DIR
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as tar:
        subprocess.run(["git", "--git-dir", gguf_node_source(), "archive", "HEAD"], stdout=tar, check=True,
                       timeout=120)
        tar.seek(0)
        with tarfile.open(fileobj=tar) as tf:
            tf.extractall(dest, filter="data")
    if not (dest / "nodes.py").is_file():
        raise RuntimeError(f"{gguf_node_source()} does not hold ComfyUI-GGUF (no nodes.py at its HEAD)")
    return dest
