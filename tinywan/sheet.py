"""Contact sheets: rows of clip frames with a caption above each row, as one PNG (written atomically)."""

from __future__ import annotations

import os
import pathlib

import torch


def clip_strip(clip: torch.Tensor, every: int = 2) -> torch.Tensor:
    """[3, T, S, S] in [-1, 1] -> [S, W, 3] uint8: every `every`-th frame side by side."""
    v = ((clip[:, ::every].float().cpu() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    frames = list(v.permute(1, 2, 3, 0))
    # A one-pixel white line between frames makes motion over a static texture visible.
    line = torch.full((frames[0].shape[0], 1, 3), 255, dtype=torch.uint8)
    out = []
    for f in frames:
        out += [f, line]
    return torch.cat(out[:-1], dim=1)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a readable scalable font
    except TypeError:
        return ImageFont.load_default()


def write_contact_sheet(rows, labels, path, *, scale: int = 3, every: int = 2, gap: int = 4, title=(),
                        part_labels=None, font_size: int = 13):
    """rows: list of strips (clip_strip output) or lists of strips shown side by side with a gap.

    labels: one caption line per row, drawn above it. title: lines drawn once at the top. part_labels: one label
    per part of a row (e.g. ["dense", "sparse"]), drawn above each part of every row, so each half of the picture
    says what it is."""
    from PIL import Image, ImageDraw
    font = _font(font_size)
    line_h = font_size + 5
    strips, part_x = [], []
    for row in rows:
        parts = row if isinstance(row, (list, tuple)) else [row]
        parts = [p if p.dim() == 3 and p.shape[-1] == 3 else clip_strip(p, every) for p in parts]
        xs, x = [], 0
        for p in parts:
            xs.append(x)
            x += p.shape[1] + gap
        part_x.append(xs)
        if len(parts) > 1:
            sep = torch.full((parts[0].shape[0], gap, 3), 255, dtype=torch.uint8)
            joined = [parts[0]]
            for p in parts[1:]:
                joined += [sep, p]
            parts = [torch.cat(joined, dim=1)]
        strips.append(parts[0])
    title = list(title)
    width = max(s.shape[1] for s in strips) * scale
    width = max([width] + [int(font.getlength(t)) + 8 for t in [*title, *labels]])
    extra = line_h if part_labels else 0
    height = len(title) * line_h + (gap if title else 0) + sum(s.shape[0] * scale + line_h + extra + gap
                                                                for s in strips)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for t in title:
        draw.text((2, y), t, fill=(0, 0, 0), font=font)
        y += line_h
    y += gap if title else 0
    for s, label, xs in zip(strips, labels, part_x):
        draw.text((2, y), label, fill=(0, 0, 0), font=font)
        y += line_h
        if part_labels:
            for x, text in zip(xs, part_labels):
                draw.text((x * scale + 2, y), text, fill=(40, 40, 160), font=font)
            y += line_h
        img = Image.fromarray(s.numpy()).resize((s.shape[1] * scale, s.shape[0] * scale), Image.NEAREST)
        sheet.paste(img, (0, y))
        y += s.shape[0] * scale + gap
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    os.replace(tmp, path)
    return path
