"""The tiny text-to-video model: a diffusers WanTransformer3DModel working directly in pixel space, plus its
caption encoder, stored together in one safetensors file with a recorded sha256.

Pixel space: the "VAE" is the identity (clips are RGB in [-1, 1]), and the transformer's own (2, 2, 2) patch
embedding turns 16 frames of 32x32 px into 8 x 16 x 16 = 2048 tokens (8 frames of 256 tokens each).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..masks.geometry import ModelSignature, TokenGrid
from . import data
from .text import CaptionEncoder, vocabulary

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "tinywan.safetensors"
CHECKSUM_FILE = WEIGHTS_DIR / "tinywan.sha256"


@dataclass(frozen=True)
class TinyWanConfig:
    dim_heads: int = 4
    head_dim: int = 32
    layers: int = 6
    ffn_dim: int = 512
    text_dim: int = 64
    freq_dim: int = 64
    patch: tuple = (2, 2, 2)
    frames: int = data.FRAMES
    size: int = data.SIZE

    @property
    def dim(self) -> int:
        return self.dim_heads * self.head_dim

    def grid(self, frames: int | None = None, size: int | None = None) -> TokenGrid:
        f, s = frames or self.frames, size or self.size
        return TokenGrid(frames=f // self.patch[0], height=s // self.patch[1], width=s // self.patch[2],
                         patch=tuple(self.patch), vae_stride=(1, 1, 1))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TinyWanConfig":
        d = dict(d)
        d["patch"] = tuple(d["patch"])
        return cls(**d)


def build_transformer(cfg: TinyWanConfig):
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(
        patch_size=tuple(cfg.patch), num_attention_heads=cfg.dim_heads, attention_head_dim=cfg.head_dim,
        in_channels=3, out_channels=3, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=64)


class TinyWan(nn.Module):
    """Transformer + caption encoder. `signature()` is what mask bundles are keyed on: a Wan 2.1 architecture
    ("wan21", 3 input channels, 2x2x2 patches), the signature any host reads off this transformer."""

    def __init__(self, cfg: TinyWanConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = build_transformer(cfg)
        self.text = CaptionEncoder(cfg.text_dim, vocabulary())

    def signature(self) -> ModelSignature:
        from ..adapters.diffusers_wan import wan_signature
        return wan_signature(self.transformer)

    def state_for_file(self, dtype=torch.float32) -> dict:
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tinywan(model: TinyWan, path, *, extra_meta: dict | None = None, dtype=torch.float32) -> str:
    """Write the weights atomically; returns the file's sha256."""
    from safetensors.torch import save_file
    path = pathlib.Path(path)
    meta = {"format": "calibatt-tinywan", "config": json.dumps(model.cfg.to_dict()),
            "vocab": json.dumps(model.text.vocab)}
    for k, v in (extra_meta or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tmp = path.with_name(path.name + ".tmp")
    save_file(model.state_for_file(dtype), str(tmp), metadata=meta)
    os.replace(tmp, path)
    return file_sha256(path)


class WeightsError(RuntimeError):
    pass


# The shipped models (tinywan/weights/README.md): the 32 px base model (the default, fast on a CPU) and a wider 64 px
# model (8,192 tokens per clip, the size where block-sparse attention beats dense on a GPU; 4 heads x 64, whose finer
# 3D RoPE positions let heads attend locally).
SHIPPED = ("tinywan", "tinywan64w")


def shipped_path(name: str = "tinywan") -> pathlib.Path:
    if name not in SHIPPED:
        raise WeightsError(f"unknown shipped tiny model {name!r}; choose one of {', '.join(SHIPPED)}")
    return WEIGHTS_FILE if name == "tinywan" else WEIGHTS_DIR / f"{name}.safetensors"


def _checksum_file(path: pathlib.Path):
    if path.resolve() == WEIGHTS_FILE.resolve():
        return CHECKSUM_FILE
    if path.resolve().parent == WEIGHTS_DIR.resolve() and path.stem in SHIPPED:
        return WEIGHTS_DIR / f"{path.stem}.sha256"
    return None


def load_tinywan(path=None, *, name: str = "tinywan", device="cpu", dtype=torch.float32,
                 verify: bool = True) -> TinyWan:
    """Load a shipped model (`name`, see SHIPPED) or `path`, checking the recorded sha256 of shipped files."""
    from safetensors import safe_open
    path = pathlib.Path(path) if path is not None else shipped_path(name)
    if not path.is_file():
        raise WeightsError(f"{path}: tiny model weights not found; they ship in tinywan/weights/ "
                           f"(retrain with `python tinywan/train.py`)")
    checksum = _checksum_file(path) if verify else None
    if checksum is not None:
        want = checksum.read_text().split()[0]
        got = file_sha256(path)
        if got != want:
            raise WeightsError(f"{path}: sha256 {got} does not match {checksum.name} ({want}); the file is "
                               f"damaged or was replaced without updating the checksum")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "calibatt-tinywan":
            raise WeightsError(f"{path}: not a tiny-model weights file (metadata 'format' is "
                               f"{meta.get('format')!r}, expected 'calibatt-tinywan')")
        cfg = TinyWanConfig.from_dict(json.loads(meta["config"]))
        state = {k: f.get_tensor(k) for k in f.keys()}
    if json.loads(meta["vocab"]) != vocabulary():
        raise WeightsError(f"{path}: vocabulary field differs from tinywan/text.py's grammar; retrain or restore "
                           f"the matching code")
    model = TinyWan(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: weights do not match the model config (missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]})")
    return model.to(device=device, dtype=dtype).eval()


def file_metadata(path=None) -> dict:
    from safetensors import safe_open
    with safe_open(str(path or WEIGHTS_FILE), framework="pt") as f:
        return dict(f.metadata() or {})
