"""A procedural text-to-video data set: coloured shapes moving over textured backgrounds, made in code.

Every clip comes with a caption from a small grammar, e.g. "a red square moving left over a blue grid" or
"a red square and a green circle crossing over a blue grid". Rendering is vectorised torch on any device, so
training draws fresh clips on the GPU each step and tests draw a few on the CPU.

Some single-object (colour, shape, motion) combinations are held out of training (`is_held_out`): every word
they use is seen in training, only the combination is new, so generating them tests composition, and the demo
and the fidelity benchmark evaluate on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COLORS = {
    "red": (1.0, 0.15, 0.15), "green": (0.2, 0.9, 0.2), "blue": (0.25, 0.4, 1.0), "yellow": (1.0, 0.9, 0.1),
    "white": (1.0, 1.0, 1.0), "purple": (0.7, 0.25, 0.95), "cyan": (0.1, 0.9, 0.9), "orange": (1.0, 0.55, 0.1),
}
SHAPES = ("square", "circle", "triangle", "diamond")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "growing", "shrinking")
CROSSING = "crossing"  # two objects, the first moving right and the second moving left
TEXTURES = ("grid", "stripes", "checkerboard", "dots")
COLOR_NAMES = tuple(COLORS)

FRAMES = 16
SIZE = 32


def is_held_out(color: int, shape: int, motion: int) -> bool:
    """The single-object combinations never shown in training (about 1 in 11, spread over every word)."""
    return (3 * color + 5 * shape + 7 * motion) % 11 == 0


@dataclass(frozen=True)
class Spec:
    """One clip's content: indices into COLORS / SHAPES / MOTIONS / TEXTURES; motion -1 with a second object
    means crossing."""

    color: int
    shape: int
    motion: int  # index into MOTIONS, or -1 for crossing
    bg_color: int
    texture: int
    color2: int = -1
    shape2: int = -1

    def caption(self) -> str:
        bg = f"over a {COLOR_NAMES[self.bg_color]} {TEXTURES[self.texture]}"
        if self.motion < 0:
            return (f"a {COLOR_NAMES[self.color]} {SHAPES[self.shape]} and a {COLOR_NAMES[self.color2]} "
                    f"{SHAPES[self.shape2]} {CROSSING} {bg}")
        return f"a {COLOR_NAMES[self.color]} {SHAPES[self.shape]} {MOTIONS[self.motion]} {bg}"

    @property
    def held_out(self) -> bool:
        return self.motion >= 0 and is_held_out(self.color, self.shape, self.motion)


_PLURAL_TEXTURES = ("stripes", "dots")


def display_caption(caption: str) -> str:
    """A caption as a person writes it, for labels only: "an orange circle ... over white dots".

    The model reads the grammar's own form ("a orange circle ... over a white dots"): its vocabulary has no "an"
    and it was trained on that form, so prompts stay as they are and only what is shown to people changes.
    """
    words = caption.split()
    out = []
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w == "a" and i >= 1 and words[i - 1] == "over" and i + 2 < len(words) and words[i + 2] in _PLURAL_TEXTURES:
            continue  # "over a white dots" -> "over white dots"
        if w == "a" and nxt[:1] in "aeiou" and nxt:
            w = "an"
        out.append(w)
    return " ".join(out)


def parse_caption(caption: str) -> Spec:
    """Inverse of Spec.caption (used to render the ground truth of a prompt); ValueError names the bad part."""
    words = caption.strip().lower().split()
    try:
        over = words.index("over")
        bg_color, texture = COLOR_NAMES.index(words[over + 2]), TEXTURES.index(words[over + 3])
        if "and" in words:
            a = words.index("and")
            return Spec(COLOR_NAMES.index(words[1]), SHAPES.index(words[2]), -1, bg_color, texture,
                        COLOR_NAMES.index(words[a + 2]), SHAPES.index(words[a + 3]))
        return Spec(COLOR_NAMES.index(words[1]), SHAPES.index(words[2]), MOTIONS.index(" ".join(words[3:over])),
                    bg_color, texture)
    except (ValueError, IndexError):
        raise ValueError(f"caption {caption!r} is not in the grammar: 'a <colour> <shape> <motion> over a <colour> "
                         f"<texture>' or 'a <colour> <shape> and a <colour> <shape> crossing over a <colour> "
                         f"<texture>'; colours {COLOR_NAMES}, shapes {SHAPES}, motions {MOTIONS}, "
                         f"textures {TEXTURES}") from None


def sample_specs(n: int, generator: torch.Generator, *, held_out: bool = False, crossing_share: float = 0.2):
    """n random specs from the training distribution (held_out=False) or from the held-out combinations."""
    out = []
    def rnd(k):
        return int(torch.randint(k, (1,), generator=generator))
    while len(out) < n:
        bg, tex = rnd(len(COLORS)), rnd(len(TEXTURES))
        if not held_out and float(torch.rand((), generator=generator)) < crossing_share:
            c1, c2 = rnd(len(COLORS)), rnd(len(COLORS))
            out.append(Spec(c1, rnd(len(SHAPES)), -1, bg, tex, c2, rnd(len(SHAPES))))
            continue
        c, s, m = rnd(len(COLORS)), rnd(len(SHAPES)), rnd(len(MOTIONS))
        if is_held_out(c, s, m) == held_out and c != bg:
            out.append(Spec(c, s, m, bg, tex))
    return out


def _shape_alpha(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage (0..1) of each shape type; shape [B] broadcasts over [B, T, S, S]."""
    ax, ay = dx.abs(), dy.abs()
    d_square = torch.maximum(ax, ay) - r
    d_circle = torch.sqrt(dx * dx + dy * dy) - r * 1.1
    d_diamond = (ax + ay - r * 1.4) / math.sqrt(2.0)
    # Upward triangle: base at dy = +r, apex at dy = -1.2 r.
    d_tri = torch.maximum(dy - r, (2.0 * ax - (dy + 1.2 * r) * 0.9) / math.sqrt(5.0))
    d = torch.stack([d_square, d_circle, d_tri, d_diamond])  # [4, B, T, S, S]
    idx = shape.view(1, -1, 1, 1, 1).expand(1, *d.shape[1:])
    return torch.clamp(0.5 - d.gather(0, idx)[0], 0.0, 1.0)


def _texture(texture: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, ox: torch.Tensor, oy: torch.Tensor):
    """[B, S, S] pattern in {0, 1} for each texture type, offset by (ox, oy) pixels."""
    x = (X[None] + ox[:, None, None]) % 8
    y = (Y[None] + oy[:, None, None]) % 8
    xx = X[None] + ox[:, None, None]
    yy = Y[None] + oy[:, None, None]
    grid = ((x < 1) | (y < 1)).float()
    stripes = (((xx + yy) // 4) % 2).float()
    checker = (((xx // 8) + (yy // 8)) % 2).float()
    dots = (((x - 3.5) ** 2 + (y - 3.5) ** 2) < 4.5).float()
    pats = torch.stack([grid, stripes, checker, dots])  # [4, B, S, S]
    return pats.gather(0, texture.view(1, -1, 1, 1).expand(1, *pats.shape[1:]))[0]


def render(specs, generator: torch.Generator, *, device="cpu", frames: int = FRAMES, size: int = SIZE):
    """Clips [B, 3, frames, size, size] in [-1, 1] for the specs; positions, sizes and texture offsets are drawn
    from `generator` (a CPU generator, so the same seed gives the same clips on any device)."""
    B = len(specs)
    g = generator
    f = lambda name: torch.tensor([getattr(s, name) for s in specs], dtype=torch.long)  # noqa: E731
    color, shape, motion, bg_color, texture = f("color"), f("shape"), f("motion"), f("bg_color"), f("texture")
    color2, shape2 = f("color2").clamp(min=0), f("shape2").clamp(min=0)
    crossing = motion < 0
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)

    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, generator=g)  # noqa: E731
    t = torch.linspace(0.0, 1.0, frames)[None, :]  # [1, T]
    # Objects, textures and travel keep their pixel sizes on larger canvases; lanes spread over the canvas. A larger
    # canvas is a wider view of the same world (more tokens, the same local structure), and size 32 draws exactly
    # the clips the shipped model was trained on.
    r0 = u(3.5, 6.0)
    travel = u(14.0, 20.0)
    start = u(4.0, 8.0) + r0 * 0.5
    lane = u(9.0, size - 9.0)
    # Per motion: centre (x, y) and radius over time, [B, T].
    cx = lane[:, None].expand(B, frames).clone()
    cy = lane[:, None].expand(B, frames).clone()
    r = r0[:, None].expand(B, frames).clone()
    fwd = start[:, None] + travel[:, None] * t
    back = (size - 1 - start)[:, None] - travel[:, None] * t
    m = motion[:, None]
    cx = torch.where(m == 0, back, torch.where(m == 1, fwd, cx))
    cy = torch.where(m == 2, back, torch.where(m == 3, fwd, cy))
    floor = size - 1 - r0 - 1.0
    phase = u(0.0, 0.5)[:, None]
    bounce = floor[:, None] - u(12.0, 17.0)[:, None] * torch.abs(torch.sin(math.pi * (2.0 * t + phase)))
    cy = torch.where(m == 4, bounce, cy)
    cx = torch.where(m == 4, u(9.0, size - 9.0)[:, None].expand(B, frames), cx)
    grow = 2.0 + 8.0 * t
    r = torch.where(m == 5, grow.expand(B, frames), torch.where(m == 6, (10.0 - 8.0 * t).expand(B, frames), r))
    # Crossing: object 1 goes right on one lane, object 2 goes left on a nearby lane, passing mid-clip.
    lane2 = (lane + u(-5.0, 5.0)).clamp(8.0, size - 8.0)
    cx = torch.where(crossing[:, None], fwd, cx)
    cy = torch.where(crossing[:, None], lane[:, None].expand(B, frames), cy)
    cx2, cy2 = back, lane2[:, None].expand(B, frames)

    # Per-clip parameters are drawn on the CPU (reproducible everywhere); the pixel work runs on `device`.
    ox = torch.randint(0, 8, (B,), generator=g).float()
    oy = torch.randint(0, 8, (B,), generator=g).float()
    dev = torch.device(device)
    cx, cy, r, cx2, cy2, r0 = (x.to(dev) for x in (cx, cy, r, cx2, cy2, r0))
    shape, shape2, color, color2, bg_color, texture, crossing, ox, oy, palette = (
        x.to(dev) for x in (shape, shape2, color, color2, bg_color, texture, crossing, ox, oy, palette))
    X = torch.arange(size, dtype=torch.float32, device=dev)
    Y = X.clone()
    Xg, Yg = X[None, :].expand(size, size), Y[:, None].expand(size, size)
    pat = _texture(texture, Xg, Yg, ox, oy)  # [B, S, S]
    bg = palette[bg_color][:, :, None, None] * (0.22 + 0.38 * pat[:, None])  # [B, 3, S, S]
    video = bg[:, :, None].expand(B, 3, frames, size, size).clone()

    def paint(video, cx, cy, r, shape, col):
        dx = Xg[None, None] - cx[:, :, None, None]
        dy = Yg[None, None] - cy[:, :, None, None]
        a = _shape_alpha(shape, dx, dy, r[:, :, None, None])[:, None]  # [B, 1, T, S, S]
        return video * (1 - a) + palette[col][:, :, None, None, None] * a

    video = paint(video, cx, cy, r, shape, color)
    second = paint(video, cx2, cy2, r0[:, None].expand(B, frames), shape2, color2)
    video = torch.where(crossing[:, None, None, None, None], second, video)
    return video * 2.0 - 1.0


def batch(n: int, generator: torch.Generator, *, device="cpu", held_out: bool = False, size: int = SIZE,
          frames: int = FRAMES):
    """(clips [n, 3, T, S, S], captions) for training or evaluation."""
    specs = sample_specs(n, generator, held_out=held_out)
    return render(specs, generator, device=device, size=size, frames=frames), [s.caption() for s in specs]


def held_out_captions(n: int, seed: int = 1234):
    """A fixed list of n distinct captions whose (colour, shape, motion) was never trained on."""
    g = torch.Generator().manual_seed(seed)
    out: list = []
    while len(out) < n:
        c = sample_specs(1, g, held_out=True)[0].caption()
        if c not in out:
            out.append(c)
    return out


def training_captions(n: int, seed: int = 4321):
    """A fixed list of n distinct single-object captions from the training combinations (calibration prompts)."""
    g = torch.Generator().manual_seed(seed)
    out: list = []
    while len(out) < n:
        c = sample_specs(1, g, crossing_share=0.0)[0].caption()
        if c not in out:
            out.append(c)
    return out
