"""Calibration settings: the eps(t) schedule, the vote, repetition and sharing thresholds, all in one dataclass.

eps(t) = A + (C - A) * exp(-k * t / T), t = 0 the noisiest step, T the number of steps of the schedule. A row of a
query block keeps the smallest set of key blocks whose attention mass (plus the mass on text keys, which are always
computed) reaches eps(t). Presets are starting points: "balanced" is the paper's Wan schedule (C = 0.99, k = 16,
A about 0.84); "quality" keeps more mass late in sampling, "fast" less; "distilled" is the paper's schedule for
few-step distilled models (LightX2V-style 4 steps at CFG 1: C = 0.863, A = 0.763, k = 5.64).

stats_row_stride s: block energy is estimated from every s-th query row of each 128-row block (the offset rotates
with the step and layer, so every row is used somewhere), which makes the statistics kernel about s times
cheaper. Neighbouring video tokens attend alike, so the per-block mean row mass changes little; the numbers behind
the default are in docs/BENCHMARKS.md "## Calibration" (bench/bench_calibration.py --quality). 1 = exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

# (A, C, k)
EPS_PRESETS = {
    "quality": (0.92, 0.995, 12.0),
    "balanced": (0.84, 0.99, 16.0),
    "fast": (0.76, 0.97, 16.0),
    # Few-step distilled models (the paper's 4-step schedule): each step moves far along the trajectory, so the
    # mass to keep starts lower and falls less steeply than on a 30-50 step schedule.
    "distilled": (0.763, 0.863, 5.64),
}


# The recorded preset of any eps schedule that is not exactly a named preset's (A, C, k): what the Calibrate node's
# "custom", an "A:C:k" command-line value and a preset with some of A, C, k overridden all become, so a bundle's
# reader never sees a preset name beside numbers that are not that preset's.
CUSTOM = "custom"


def eps_spec(text: str) -> dict:
    """CalibrationSettings keywords for a preset name ("quality", "balanced", "fast", "distilled") or an explicit eps
    schedule "A:C:k" (e.g. "0.97:0.995:12" -> preset "custom"), the form command lines and benchmarks take."""
    text = str(text).strip()
    if ":" not in text:
        if text not in EPS_PRESETS:
            raise ValueError(f"eps setting {text!r}: use a preset ({', '.join(EPS_PRESETS)}) or A:C:k, "
                             "e.g. 0.97:0.995:12")
        return {"preset": text}
    try:
        A, C, k = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"eps setting {text!r}: A:C:k needs three numbers, e.g. 0.97:0.995:12") from None
    return {"preset": CUSTOM, "A": A, "C": C, "k": k}


# How a prompt's keep mask is chosen from its block mass (calibration/selection.py):
#   "row"    every query-block row of every head keeps the fewest key blocks reaching eps(t) (the paper's rule);
#   "global" one mass threshold per calibrated step over all layers, heads and rows, the lowest whose mean row
#            coverage reaches eps(t): the density goes where the mass is, no row is promised eps on its own.
SELECTIONS = ("row", "global")

# Largest stride whose quality loss on the planted-structure study stayed small (docs/BENCHMARKS.md: every
# planted block kept, eps shortfall on the full-row mass <= 0.016, held-out error +0-3.5 %) for 3.7x cheaper stats.
STATS_ROW_STRIDE_DEFAULT = 4


@dataclass
class CalibrationSettings:
    # After __post_init__ A, C and k are always the schedule's numbers and preset names it: the EPS_PRESETS name
    # whose (A, C, k) they are exactly, else CUSTOM. One schedule, one spelling, whichever way it was given.
    preset: str = "balanced"  # a name in EPS_PRESETS, or CUSTOM with A, C and k all given
    A: Optional[float] = None  # eps after many steps; None: the preset's
    C: Optional[float] = None  # eps at t = 0; None: the preset's
    k: Optional[float] = None  # decay rate; None: the preset's
    rho: float = 0.5  # keep a block if at least this share of the prompts kept it
    gamma: float = 0.87  # row similarity (1 - relative output distance to its anchor) that counts as "repeated"
    anchors: int = 5  # anchor rows per frame for repetitive heads
    repetition: bool = True
    # A head is repetitive for (step, layer) only if at least this share of its rows reach gamma (mean over prompts).
    rep_min_fraction: float = 0.95
    share_iou: float = 0.97  # adjacent steps whose masks have at least this IoU share one bucket
    share_after: float = 0.0  # only steps at t / T >= this may join the previous bucket (0 = anywhere)
    block_q: int = 128
    block_k: int = 128
    # Use every s-th query row of a block for the block-energy statistics (1 = all rows; see the module docstring).
    stats_row_stride: int = STATS_ROW_STRIDE_DEFAULT
    selection: str = "row"  # one of SELECTIONS
    seed: int = 0
    steps: Optional[int] = None  # schedule length T when the host does not pass its sigmas to begin_prompt
    sampler: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.preset not in EPS_PRESETS and self.preset != CUSTOM:
            raise ValueError(f"CalibrationSettings.preset must be one of {sorted(EPS_PRESETS)} or {CUSTOM!r} (with A, "
                             f"C and k), got {self.preset!r}")
        if self.preset == CUSTOM and None in (self.A, self.C, self.k):
            missing = [n for n in ("A", "C", "k") if getattr(self, n) is None]
            raise ValueError(f"CalibrationSettings: preset {CUSTOM!r} is the eps schedule given by A, C and k; "
                             f"{', '.join(missing)} not set (e.g. A=0.84, C=0.99, k=16)")
        given = EPS_PRESETS.get(self.preset, (None, None, None))
        A, C, k = (float(v if v is not None else g) for v, g in zip((self.A, self.C, self.k), given))
        if not (0.0 < A <= C <= 1.0):
            raise ValueError(f"CalibrationSettings: eps needs 0 < A <= C <= 1, got A={A}, C={C}; "
                             "set A below C (e.g. A=0.84, C=0.99)")
        if not (math.isfinite(k) and k >= 0):
            raise ValueError(f"CalibrationSettings.k must be a finite number >= 0, got {k}")
        self.A, self.C, self.k = A, C, k
        self.preset = next((name for name, abk in EPS_PRESETS.items() if abk == (A, C, k)), CUSTOM)
        if not (0.0 < self.rho <= 1.0):
            raise ValueError(f"CalibrationSettings.rho must be in (0, 1], got {self.rho}")
        if not (0.0 < self.gamma <= 1.0):
            raise ValueError(f"CalibrationSettings.gamma must be in (0, 1], got {self.gamma}")
        if not (1 <= int(self.anchors) <= 256):
            raise ValueError(f"CalibrationSettings.anchors must be in [1, 256], got {self.anchors}")
        if not (0.0 < self.share_iou <= 1.0):
            raise ValueError(f"CalibrationSettings.share_iou must be in (0, 1], got {self.share_iou}")
        if self.block_q <= 0 or self.block_k <= 0:
            raise ValueError(f"CalibrationSettings block sizes must be positive, got {self.block_q}x{self.block_k}")
        rs = self.stats_row_stride
        if isinstance(rs, bool) or not isinstance(rs, int) or not (1 <= rs <= 64):
            raise ValueError(f"CalibrationSettings.stats_row_stride must be an integer in [1, 64] (1 = every query row "
                             f"feeds the statistics, 4 = every 4th), got {rs!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"CalibrationSettings.selection must be one of {', '.join(map(repr, SELECTIONS))} "
                             f"(\"row\": eps per query-block row, \"global\": one mass threshold per step over "
                             f"all layers and heads), got {self.selection!r}")
        if self.steps is not None and int(self.steps) <= 0:
            raise ValueError(f"CalibrationSettings.steps must be positive or None, got {self.steps}")

    def eps_params(self):
        return self.A, self.C, self.k

    def eps(self, t_index: int, num_steps: int) -> float:
        """Mass to keep at step t_index (0 = noisiest) of a num_steps schedule."""
        if num_steps <= 0:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        A, C, k = self.eps_params()
        return A + (C - A) * math.exp(-k * float(t_index) / float(num_steps))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationSettings":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown calibration settings {unknown}; known: {sorted(names)}")
        return cls(**{k: (dict(v) if k == "extra" else v) for k, v in d.items()})

    def selection_key(self) -> dict:
        """The settings that change per-prompt statistics; runs can only be merged when these agree."""
        A, C, k = self.eps_params()
        return {"A": A, "C": C, "k": k, "block_q": self.block_q, "block_k": self.block_k, "gamma": self.gamma,
                "anchors": int(self.anchors), "selection": self.selection}
