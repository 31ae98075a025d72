"""What a bundle was calibrated for: the model's shape (signature) and the token grid of one latent video.

Both are plain frozen dataclasses with dict round trips, so the bundle's JSON metadata, the host adapters and
the compatibility check all speak the same terms.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from .errors import BundleError

KNOWN_FAMILIES = ("wan21", "wan22", "mochi", "hunyuan", "ltxv", "tinywan", "generic")
# Where joint-attention text tokens sit in the self-attention sequence: "end" (after the video tokens: Mochi,
# HunyuanVideo on ComfyUI 0.3.x) or "start" (before them: HunyuanVideo on ComfyUI 0.19+); "none" without text.
TEXT_POSITIONS = ("none", "end", "start")


@dataclass(frozen=True)
class ModelSignature:
    """The shape facts that identify a checkpoint family; a bundle only fits models with the same signature.
    Hosts make them through the family builders in masks/signatures.py, so every host makes the same one."""

    family: str
    num_layers: int
    num_heads: int
    head_dim: int
    dim: int
    # Anything else that separates checkpoints of one family (e.g. in_channels for I2V vs T2V); each family's
    # fields are fixed by its builder in masks/signatures.py, which every host calls.
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSignature":
        """A stored signature (bundle file, calibration statistics), read as today's builders would make it for
        the same model (masks/signatures.py `current`), so files written by older versions still fit."""
        from .signatures import current  # signatures builds on this class

        return current(cls(
            family=str(d["family"]),
            num_layers=int(d["num_layers"]),
            num_heads=int(d["num_heads"]),
            head_dim=int(d["head_dim"]),
            dim=int(d["dim"]),
            extra=dict(d.get("extra", {})),
        ))

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def mismatches(self, other: "ModelSignature") -> list[str]:
        """Human sentences for every field where `other` (the model in use) differs from self (the bundle)."""
        out = []
        if self.family != other.family:
            out.append(f"bundle was calibrated for model family '{self.family}'; this model is '{other.family}'")
        for name, unit in (("num_layers", "layers"), ("num_heads", "attention heads"),
                           ("head_dim", "head_dim"), ("dim", "hidden size")):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"bundle was calibrated for {a} {unit}; this model has {b}")
        for key in sorted(set(self.extra) | set(other.extra)):
            a, b = self.extra.get(key), other.extra.get(key)
            if a != b:
                out.append(f"bundle was calibrated for {key}={a}; this model has {key}={b}")
        return out


@dataclass(frozen=True)
class TokenGrid:
    """The self-attention token layout of one latent video.

    Video tokens are in frame-major order (video index i = t * height * width + h * width + w). Joint-attention
    models (Mochi, HunyuanVideo) add `text_tokens` text tokens, either after the video (text_position "end":
    video token i at sequence index i, text token j at video_tokens + j) or before it ("start": text token j at j,
    video token i at text_tokens + i). Text tokens always attend to and are attended by everything, so masks
    cover the video part only and do not depend on where the text sits: a bundle made with one text position
    serves calls with the other. Use `video_start` / `text_start` rather than assuming an order.
    """

    frames: int  # latent frames after patching
    height: int  # tokens
    width: int  # tokens
    patch: tuple = (1, 2, 2)  # latent voxels per token (t, h, w)
    order: str = "thw"
    text_tokens: int = 0
    text_position: str = "none"  # "none", "end" (text after the video) or "start" (text before it)
    # Pixels per latent voxel (t, h, w); only used to phrase messages in pixels / frames.
    vae_stride: tuple = (4, 8, 8)

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            if int(getattr(self, name)) <= 0:
                raise BundleError(f"token grid {name} must be positive, got {getattr(self, name)}", field=f"grid.{name}")
        if self.text_position not in TEXT_POSITIONS:
            raise BundleError(f"text_position must be one of {TEXT_POSITIONS}", field="grid.text_position")
        if self.order != "thw":
            raise BundleError(f"only frame-major 'thw' token order is supported, got '{self.order}'", field="grid.order")
        if (self.text_tokens > 0) != (self.text_position != "none"):
            raise BundleError("text_tokens > 0 requires text_position 'end' or 'start' (and 'none' requires 0)",
                              field="grid.text_tokens")

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def total_tokens(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_start(self) -> int:
        """Sequence index of the first video token (the text tokens come first with text_position "start")."""
        return self.text_tokens if self.text_position == "start" else 0

    @property
    def text_start(self) -> int:
        """Sequence index of the first text token (0 with text_position "start", else right after the video)."""
        return 0 if self.text_position == "start" else self.video_tokens

    def describe(self) -> str:
        pt, ph, pw = self.patch
        st, sh, sw = self.vae_stride
        px_h, px_w = self.height * ph * sh, self.width * pw * sw
        frames_px = (self.frames * pt - 1) * st + 1
        text = ""
        if self.text_tokens:
            text = (f" + {self.text_tokens} text tokens"
                    + (" (before the video)" if self.text_position == "start" else ""))
        return (f"{self.frames}x{self.height}x{self.width} tokens (about {px_w}x{px_h} px, "
                f"{frames_px} frames){text}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch"] = list(self.patch)
        d["vae_stride"] = list(self.vae_stride)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenGrid":
        return cls(
            frames=int(d["frames"]), height=int(d["height"]), width=int(d["width"]),
            patch=tuple(int(x) for x in d.get("patch", (1, 2, 2))),
            order=str(d.get("order", "thw")),
            text_tokens=int(d.get("text_tokens", 0)),
            text_position=str(d.get("text_position", "none")),
            vae_stride=tuple(int(x) for x in d.get("vae_stride", (4, 8, 8))),
        )

    def mismatches(self, other: "TokenGrid", text: bool = True) -> list[str]:
        """Sentences for each way `other` (the latent in use) differs from self (what the bundle was made for).
        text=False compares the video part only: joint-attention models (Mochi, HunyuanVideo) carry a
        prompt-dependent number of text tokens, which are always computed densely, so masks do not depend on it.
        The text position ("end" / "start") is never compared, for the same reason: masks describe the video tokens
        only, so a bundle calibrated with the text after the video fits calls with the text before it."""
        out = []
        if self.frames != other.frames:
            out.append(f"bundle was calibrated for {self.frames} latent frames; this video has {other.frames} "
                       f"(video length differs)")
        if (self.height, self.width) != (other.height, other.width):
            out.append(f"bundle was calibrated for a {self.height}x{self.width}-token frame; this video has "
                       f"{other.height}x{other.width} (resolution differs)")
        if text and self.text_tokens != other.text_tokens:
            out.append(f"bundle was calibrated with {self.text_tokens} text tokens in self-attention; "
                       f"this call has {other.text_tokens}")
        if tuple(self.patch) != tuple(other.patch):
            out.append(f"bundle was calibrated for patch size {tuple(self.patch)}; this model uses {tuple(other.patch)}")
        return out


def num_blocks(tokens: int, block: int) -> int:
    return int(math.ceil(tokens / block))


def key_block_density(kept_blocks, nq: int, nk: int, repetitive=None, share: float = 0.0):
    """The density every report and decision uses: kept key blocks (a tensor of per-head or per-entry totals, any
    shape) over nq * nk, as float64; entries where `repetitive` (a bool tensor of the same shape) is set count at
    `share`, their anchor rows' share (anchor_share), since only those rows are computed."""
    import torch

    dens = kept_blocks.double() / (nq * nk)
    if repetitive is not None:
        dens = torch.where(repetitive.to(dens.device), torch.full_like(dens, float(share)), dens)
    return dens


def anchor_share(num_tokens: int, frame_tokens: int, anchors_per_frame: int) -> float:
    """The key-block density a repetitive head counts as: only its anchor rows (anchors_per_frame per frame of
    frame_tokens) attend, to every key, so its work is their share of the num_tokens video rows."""
    frames = max(1, num_tokens // frame_tokens)
    return min(1.0, frames * anchors_per_frame / num_tokens)
