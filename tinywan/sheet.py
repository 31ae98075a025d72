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


def write_contact_sheet(rows, labels, path, *, scale: int = 3, every: int = 2, gap: int = 4):
    """rows: list of strips (clip_strip output) or lists of strips shown side by side with a gap."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    line_h = 14
    strips = []
    for row in rows:
        parts = row if isinstance(row, (list, tuple)) else [row]
        parts = [p if p.dim() == 3 and p.shape[-1] == 3 else clip_strip(p, every) for p in parts]
        if len(parts) > 1:
            sep = torch.full((parts[0].shape[0], gap, 3), 255, dtype=torch.uint8)
            joined = [parts[0]]
            for p in parts[1:]:
                joined += [sep, p]
            parts = [torch.cat(joined, dim=1)]
        strips.append(parts[0])
    width = max(s.shape[1] for s in strips) * scale
    height = sum(s.shape[0] * scale + line_h + gap for s in strips)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for s, label in zip(strips, labels):
        draw.text((2, y), label, fill=(0, 0, 0), font=font)
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
